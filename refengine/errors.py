"""The one base class for errors that are the user's to fix, and how their messages are shown.

The CLI prints any RefengineError as a single line and exits non-zero; anything
else reaching the top is a bug in refengine and keeps its traceback.
"""


class RefengineError(Exception):
    """Bad input: a file, model, tensor, shape or flag. The message names which."""


def printable(text: str) -> str:
    """`text` safe to print on a terminal: control characters (a file's metadata may hold terminal
    escapes), lone surrogates (invalid UTF-8 read with surrogateescape) and other unprintable
    characters are shown as Python escapes."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def one_line(message: object) -> str:
    """A message as one printable line: its lines joined with " | "."""
    return printable(" | ".join(line.strip() for line in str(message).splitlines() if line.strip()))
