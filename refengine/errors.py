"""The one base class for errors that are the user's to fix.

The CLI prints any RefengineError as a single line and exits non-zero; anything
else reaching the top is a bug in refengine and keeps its traceback.
"""


class RefengineError(Exception):
    """Bad input: a file, model, tensor, shape or flag. The message names which."""
