"""The `refengine` command line.

Every user error (a missing file, a corrupt GGUF, an unknown tensor, a bad
flag) ends as one line on stderr and a non-zero exit, never a traceback:
`main` turns the project's error types into that line.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import click

from refengine import __version__
from refengine.errors import RefengineError
from refengine.gguf import GGUFFile, open_gguf
from refengine.models import DEFAULT_MODEL, resolve_model

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

EXIT_ERROR = 1  # bad input: file, model, tensor
EXIT_USAGE = 2  # bad flags, as click and argparse use it
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


class UserError(RefengineError):
    """A request the CLI itself refuses; printed as one line like every RefengineError."""


def load_model(model: str) -> GGUFFile:
    return open_gguf(resolve_model(model))


MODEL_ARGUMENT = click.argument("model", default=DEFAULT_MODEL, metavar="MODEL")
MODEL_HELP = f"MODEL is a .gguf path (any split of a split model) or a short name: {DEFAULT_MODEL}, smollm2-135m."


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="refengine")
def cli() -> None:
    """refengine: a CPU reference inference engine for GGUF language models."""


@cli.command(epilog=MODEL_HELP)
@MODEL_ARGUMENT
@click.option("--tensors", is_flag=True, help="Also list every tensor: name, type, shape, bytes, offset.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of text.")
def info(model: str, tensors: bool, as_json: bool) -> None:
    """Describe a model from its GGUF header: architecture, size, types, tokenizer."""
    from refengine.info import render, summarize

    summary = summarize(load_model(model), with_tensors=tensors)
    click.echo(json.dumps(summary, indent=2) if as_json else render(summary))


@cli.command(epilog=MODEL_HELP)
@click.argument("model", metavar="MODEL")
@click.argument("name", metavar="NAME")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, writable=True, path_type=Path), required=True,
    help="Where to write the .npy file.",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def tensor(model: str, name: str, output: Path, as_json: bool) -> None:
    """Write tensor NAME of MODEL, dequantized to float32, as a .npy file.

    The array has the shape gguf.quants.dequantize gives (rows x columns, GGUF's
    ne reversed), so it can be compared directly with other implementations.
    """
    import numpy as np

    gguf_file = load_model(model)
    t = gguf_file.tensor(name)
    if any(_same_file(output, p) for p in gguf_file.splits):
        raise UserError(f"--output {output} is the model file itself; refusing to overwrite it")
    array = t.to_numpy()
    # Write beside the target and rename, so an interrupted run leaves no half-written file.
    fd, tmp = tempfile.mkstemp(dir=output.parent if str(output.parent) else ".", suffix=".npy.partial")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    record = {"tensor": name, "type": t.ggml_type.name, "shape": list(array.shape), "output": str(output)}
    if as_json:
        click.echo(json.dumps(record))
    else:
        shape = " x ".join(map(str, array.shape))
        click.echo(f"{name}: {t.ggml_type.name} {shape} -> float32 {output}", err=True)


@cli.command(epilog=MODEL_HELP)
@click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True, metavar="MODEL",
              help="The model to use.")
@click.option("--no-bos", is_flag=True, help="Do not add the BOS token, even if the model asks for it.")
@click.option("--parse-special", is_flag=True,
              help="Read special-token text such as <start_of_turn> as that token, not as plain text.")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"tokens": [...]} instead of space-separated ids.')
@click.argument("text", metavar="TEXT")
def tokenize(model: str, no_bos: bool, parse_special: bool, as_json: bool, text: str) -> None:
    """Print the token ids of TEXT, the ones llama.cpp gives."""
    from refengine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(load_model(model))
    # argv bytes that are not UTF-8 reach us surrogate-escaped; encode() turns them back into those bytes.
    ids = tokenizer.encode(text, add_bos=False if no_bos else None, parse_special=parse_special)
    click.echo(json.dumps({"tokens": ids}) if as_json else " ".join(map(str, ids)))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and turn every expected failure into one line on stderr."""
    prog = "refengine"
    try:
        cli.main(args=argv, prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as e:  # --help, --version
        return e.exit_code
    except click.UsageError as e:
        command = e.ctx.command_path if e.ctx else prog
        click.echo(f"{command}: error: {e.format_message()} (see '{command} -h')", err=True)
        return EXIT_USAGE
    except click.ClickException as e:
        click.echo(f"{prog}: error: {e.format_message()}", err=True)
        return e.exit_code
    except RefengineError as e:
        click.echo(f"{prog}: error: {e}", err=True)
        return EXIT_ERROR
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo(f"{prog}: interrupted", err=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (e.g. `refengine info --tensors | head`): not an error.
        sys.stderr.close()
        return 0
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
