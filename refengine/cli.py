"""The `refengine` command line.

Every user error (a missing file, a corrupt GGUF, an unknown tensor, a bad
flag) ends as one line on stderr and a non-zero exit, never a traceback:
`main` turns the project's error types into that line.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from pathlib import Path

import click

from refengine import __version__
from refengine.errors import RefengineError, one_line
from refengine.gguf import GGUFFile, open_gguf
from refengine.models import DEFAULT_MODEL, resolve_model
from refengine.plan import NUMA_MODES, DoesNotFit
from refengine.quantize import MIXES

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

EXIT_ERROR = 1  # bad input: file, model, tensor
EXIT_USAGE = 2  # bad flags, as click and argparse use it
EXIT_DOES_NOT_FIT = 3  # generate's memory plan says the run would be killed or could not map the model
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C (and 143, 128 + SIGTERM, for SIGTERM)


class UserError(RefengineError):
    """A request the CLI itself refuses; printed as one line like every RefengineError."""


def open_model_file(model: str) -> GGUFFile:
    """The GGUF file of MODEL, a path or a short name (refengine.models.resolve_model)."""
    return open_gguf(resolve_model(model))


MODEL_ARGUMENT = click.argument("model", default=DEFAULT_MODEL, metavar="MODEL")
MAX_CTX = 2**32 - 1  # llama.cpp's n_ctx is a uint32_t
MAX_TOKEN_ID = 2**31 - 1  # llama_token is an int32_t
MODEL_OPTION = click.option(
    "-m", "--model", default=DEFAULT_MODEL, show_default=True, metavar="MODEL", help="The model to use."
)
CTX_OPTION = click.option(
    "-c",
    "--ctx",
    default=4096,
    show_default=True,
    type=click.IntRange(min=1, max=MAX_CTX),
    help="Context size (KV cache positions).",
)


def sampler_options(command):
    """The sampling flags of llama.cpp's CLI, passed to the command as one SamplerConfig `sampling`."""
    options = [
        click.option("--temp", default=0.8, show_default=True, type=float, help="Temperature; 0 is greedy."),
        click.option(
            "--top-k", default=40, show_default=True, type=int, help="Keep the k most likely tokens (0: off)."
        ),
        click.option("--top-p", default=0.95, show_default=True, type=float, help="Nucleus sampling mass (1: off)."),
        click.option(
            "--min-p", default=0.05, show_default=True, type=float, help="Drop tokens below min-p x the top one."
        ),
        click.option("--repeat-penalty", default=1.0, show_default=True, type=float, help="Penalty for recent tokens."),
        click.option("--repeat-last-n", default=64, show_default=True, type=int, help="How many recent tokens count."),
        click.option(
            "--seed",
            type=click.IntRange(min=0),
            default=None,
            help="Random seed; the same seed gives the same text.",
        ),
    ]

    @functools.wraps(command)
    def with_sampling(*args, temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, **kwargs):
        from refengine.sampler import SamplerConfig, SamplerError

        try:
            sampling = SamplerConfig(temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed)
        except SamplerError as e:  # a bad flag value: a usage error, exit status 2
            raise click.UsageError(str(e), ctx=click.get_current_context()) from None
        return command(*args, sampling=sampling, **kwargs)

    for option in reversed(options):
        with_sampling = option(with_sampling)
    return with_sampling


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

    summary = summarize(open_model_file(model), with_tensors=tensors)
    click.echo(json.dumps(summary, indent=2) if as_json else render(summary))


@cli.command(epilog=MODEL_HELP)
@click.argument("model", metavar="MODEL")
@click.argument("name", metavar="NAME")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    required=True,
    help="Where to write the .npy file.",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def tensor(model: str, name: str, output: Path, as_json: bool) -> None:
    """Write tensor NAME of MODEL, dequantized to float32, as a .npy file.

    The array has the shape gguf.quants.dequantize gives (rows x columns, GGUF's
    ne reversed), so it can be compared directly with other implementations.
    """

    gguf_file = open_model_file(model)
    t = gguf_file.tensor(name)
    array = t.to_numpy()
    write_npy(output, array, gguf_file)
    record = {"tensor": name, "type": t.ggml_type.name, "shape": list(array.shape), "output": str(output)}
    if as_json:
        click.echo(json.dumps(record))
    else:
        shape = " x ".join(map(str, array.shape))
        click.echo(f"{name}: {t.ggml_type.name} {shape} -> float32 {output}", err=True)


@cli.command(epilog=MODEL_HELP)
@MODEL_OPTION
@click.option("--no-bos", is_flag=True, help="Do not add the BOS token, even if the model asks for it.")
@click.option(
    "--parse-special",
    is_flag=True,
    help="Read special-token text such as <start_of_turn> as that token, not as plain text.",
)
@click.option("--json", "as_json", is_flag=True, help='Print {"tokens": [...]} instead of space-separated ids.')
@click.argument("text", metavar="TEXT")
def tokenize(model: str, no_bos: bool, parse_special: bool, as_json: bool, text: str) -> None:
    """Print the token ids of TEXT, the ones llama.cpp gives."""
    from refengine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(open_model_file(model))
    # argv bytes that are not UTF-8 reach us surrogate-escaped; encode() turns them back into those bytes.
    ids = tokenizer.encode(text, add_bos=False if no_bos else None, parse_special=parse_special)
    click.echo(json.dumps({"tokens": ids}) if as_json else " ".join(map(str, ids)))


PRECISION_OPTION = click.option(
    "--precision",
    type=click.Choice(["f32", "f64"]),
    default="f32",
    show_default=True,
    help="Activation precision. f64 accumulates everything in float64: the exact path oracles use.",
)


def numerics_option(default: str):
    """--numerics exact|ggml, with the command's default (`numerics_of` resolves it against --precision), and
    ggml numerics' KV cache type, --cache-type (`cache_type_of`)."""
    numerics = click.option(
        "--numerics",
        type=click.Choice(["exact", "ggml"]),
        default=None,
        help=f"exact: the file's function in float32 (or float64). ggml: llama.cpp's CPU arithmetic, bit for bit "
        f"(activations quantized to 8 bits for each matmul, an F16 KV cache; float32 only). Default: {default}, "
        "exact with --precision f64.",
    )
    cache_type = click.option(
        "-ctk",
        "--cache-type",
        type=click.Choice(["f16", "f32"]),
        default=None,
        help="With --numerics ggml, the KV cache type, as llama.cpp's -ctk/-ctv: f16 (default) or f32, which "
        "attends as llama.cpp does with flash attention off.",
    )
    return lambda command: numerics(cache_type(command))


def numerics_of(numerics: str | None, precision: str, default: str) -> str:
    """--numerics as given, or the command's default; --precision f64 is always exact."""
    if precision == "f64":
        if numerics == "ggml":
            raise click.BadParameter(
                "ggml is llama.cpp's float32 arithmetic; --precision f64 is exact", param_hint="--numerics"
            )
        return "exact"
    return numerics or default


def cache_type_of(cache_type: str | None, numerics: str) -> str | None:
    """--cache-type as given, for ggml numerics only (exact numerics caches in its precision)."""
    if cache_type is not None and numerics != "ggml":
        raise click.BadParameter("the KV cache type is ggml numerics' (--numerics ggml)", param_hint="--cache-type")
    return cache_type


SYSROOT_OPTION_TYPE = click.Path(exists=True, file_okay=False, path_type=Path)
SYSROOT_OPTION = click.option(
    "--sysroot",
    type=SYSROOT_OPTION_TYPE,
    default=Path("/"),
    show_default=True,
    metavar="DIR",
    help="Read the system from DIR/proc and DIR/sys instead: a folder that mirrors proc/meminfo, "
    "proc/self/status, sys/devices/system/node/nodeN/meminfo, sys/fs/cgroup/... (for tests).",
)
PRECISION_BYTES = {"f32": 4, "f64": 8}


def _node_list(ctx, param, text: str | None):
    from refengine.system import parse_ids

    try:
        return None if text is None else sorted(parse_ids(Path("--numa-nodes"), text))
    except RefengineError as e:  # a bad flag value: a usage error, exit status 2
        raise click.BadParameter(str(e).removeprefix("--numa-nodes: ")) from None


def numa_options(command):
    """--numa and --numa-nodes, for the commands that run a model (refengine.numa)."""
    command = click.option(
        "--numa-nodes",
        default=None,
        metavar="LIST",
        callback=_node_list,
        help="The NUMA nodes to use, e.g. 0-1 or 1 (default: every node this process may use).",
    )(command)
    return click.option(
        "--numa",
        type=click.Choice(NUMA_MODES),
        default="off",
        show_default=True,
        help="off: the kernel places pages and threads. distribute: numba's threads spread over the nodes. "
        "shard: each routed expert on one node, computed by that node's pinned threads. split: every expert's "
        "rows cut over the nodes, each node computing its rows (even work whatever the routing). Under shard "
        "and split the rest is interleaved.",
    )(command)


def load_session(
    model: str | GGUFFile,
    precision: str,
    numa: str,
    numa_nodes,
    sysroot: Path = Path("/"),
    numerics: str = "exact",
    cache_type: str | None = None,
):
    """Session.load under --numa: threads are spread before the model loads, pages placed once it is
    loaded, and the node pools close with the command. --numa off touches nothing."""
    from refengine.distributed import DistributedError, World, place_share, start
    from refengine.session import Session

    world = World.join()  # None unless started by mpirun/mpiexec with several ranks
    if world is not None:
        if numa != "off" or numa_nodes is not None:
            raise DistributedError("--numa places experts on one host's nodes; under MPI use --numa off")
        gguf_file = model if isinstance(model, GGUFFile) else open_model_file(model)
        partition = place_share(gguf_file, world)  # before loading: see refengine.distributed
        session = Session.load(gguf_file, precision, numerics, cache_type)
        status = start(session, world, partition, click.get_current_context())
        if status is not None:  # a rank other than 0: it has followed rank 0 to the end
            raise click.exceptions.Exit(status)
        return session
    if numa == "off" and numa_nodes is None:
        return Session.load(model, precision, numerics, cache_type)
    from refengine.numa import NumaRuntime, warn
    from refengine.system import read_system

    runtime = NumaRuntime(numa, read_system(sysroot), numa_nodes)
    context = click.get_current_context()
    context.call_on_close(runtime.close)
    context.meta["refengine.numa"] = runtime  # for --json reports: bytes placed and read per node
    session = Session.load(model, precision, numerics, cache_type)
    warn(runtime.attach(session.gguf, session.model))
    return session


@cli.command("plan", epilog=MODEL_HELP)
@MODEL_ARGUMENT
@click.option(
    "-c",
    "--ctx",
    default=4096,
    show_default=True,
    type=click.IntRange(min=1),
    help="Context size to plan the KV cache and activations for.",
)
@click.option(
    "--numa",
    type=click.Choice(NUMA_MODES),
    default="off",
    show_default=True,
    help="Placement to plan for: off (the kernel's), distribute (threads over nodes), shard (each expert on one "
    "node), split (every expert's rows over the nodes).",
)
@PRECISION_OPTION
@SYSROOT_OPTION
@click.option(
    "--hosts",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    metavar="N",
    help="Plan for N hosts alike (mpirun -np N, one rank a host): each holds the dense part and 1/N of the "
    "experts (refengine.distributed); every host's verdict, and the worst.",
)
@click.option("--json", "as_json", is_flag=True, help='Print every figure as JSON, with "verdict".')
def plan_command(model: str, ctx: int, numa: str, precision: str, sysroot: Path, hosts: int, as_json: bool) -> None:
    """Will MODEL run here? Its memory needs at --ctx, what this process may use, and a verdict.

    Reads only the GGUF header and /proc, /sys. The verdict is fits, pages_from_disk (the weights do not
    stay in memory: speed is bound by the disk) or does_not_fit (the run would be killed or could not
    map the model), with what to change. The exit status is 0 whatever the verdict, 3 when ulimit -v
    does not even let the model be mapped.
    """
    from refengine.plan import open_model, plan, render
    from refengine.system import read_system

    system = read_system(sysroot)
    gguf_file = open_model(resolve_model(model), system)
    result = plan(gguf_file, system, ctx, numa, itemsize=PRECISION_BYTES[precision], hosts=hosts)
    click.echo(result.to_json() if as_json else render(result))


def preflight(
    model: str, ctx: int, precision: str, sysroot: Path, max_prompt_tokens: int | None = None, numa: str = "off"
) -> GGUFFile:
    """Stop a run the memory plan says cannot fit, before anything is loaded; warn when it will page from disk.

    max_prompt_tokens bounds the prefill batch, so that a short prompt is not sized as a full context.
    Returns the opened file, for the run to load rather than open again.
    """
    from refengine.plan import open_model, plan
    from refengine.system import read_system

    system = read_system(sysroot)
    gguf_file = open_model(resolve_model(model), system)
    from refengine.distributed import world_size_from_env

    hosts = world_size_from_env()  # under mpirun, each rank holds its share of the experts
    itemsize = PRECISION_BYTES[precision]
    result = plan(gguf_file, system, ctx, numa, itemsize=itemsize, n_batch=max_prompt_tokens, hosts=hosts)
    if result.verdict == "does_not_fit":
        raise DoesNotFit(f"{gguf_file.path.name} does not fit: {result.message()} (see refengine plan; --no-plan)")
    if result.verdict == "pages_from_disk":
        click.echo(f"refengine: warning: {result.message()}", err=True)
    return gguf_file


def parse_token_list(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of token ids") from None
    if not ids:
        raise click.BadParameter("no token ids given")
    outside = [i for i in ids if not 0 <= i <= MAX_TOKEN_ID]
    if outside:
        raise click.BadParameter(f"token id {outside[0]} is not between 0 and {MAX_TOKEN_ID}")
    return ids


@cli.command(epilog=MODEL_HELP)
@MODEL_OPTION
@click.option("--tokens", required=True, metavar="IDS", help="Comma-separated token ids, evaluated as given (no BOS).")
@click.option(
    "--out",
    "output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the (n_tokens, n_vocab) float32 .npy.",
)
@PRECISION_OPTION
@numerics_option("exact")
@numa_options
def logits(model: str, tokens: str, output: Path, precision: str, numerics, cache_type, numa: str, numa_nodes) -> None:
    """Write the logits of every position of a token sequence, for comparing engines."""
    import numpy as np

    ids = parse_token_list(tokens)
    numerics = numerics_of(numerics, precision, "exact")
    session = load_session(
        model, precision, numa, numa_nodes, numerics=numerics, cache_type=cache_type_of(cache_type, numerics)
    )
    cache = session.new_cache(len(ids))
    result = session.model.forward(np.asarray(ids), cache).astype(np.float32)  # (n_tokens, n_vocab)
    write_npy(output, result, session.gguf)
    click.echo(f"logits {result.shape[0]} x {result.shape[1]} -> {output}", err=True)


@cli.command(epilog=MODEL_HELP)
@click.argument("prompt", metavar="PROMPT")
@MODEL_OPTION
@click.option(
    "-n",
    "--n-predict",
    "n_predict",
    default=128,
    show_default=True,
    type=click.IntRange(min=0),
    help="Tokens to generate at most.",
)
@CTX_OPTION
@sampler_options
@click.option("--stop", multiple=True, metavar="TEXT", help="Stop when this text appears (repeatable).")
@click.option("--chat", is_flag=True, help="Wrap PROMPT as a user message in the model's chat template.")
@click.option("--system", default=None, metavar="TEXT", help="System message, with --chat.")
@PRECISION_OPTION
@numerics_option("ggml")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@click.option(
    "--no-plan",
    is_flag=True,
    help="Skip the memory plan (refengine plan) that otherwise stops, with exit status 3, "
    "a run that cannot fit before anything is loaded.",
)
@click.option("--sysroot", type=SYSROOT_OPTION_TYPE, default=Path("/"), hidden=True)  # as refengine plan's
@numa_options
def generate(
    prompt,
    model,
    n_predict,
    ctx,
    sampling,
    stop,
    chat,
    system,
    precision,
    numerics,
    cache_type,
    as_json,
    no_plan,
    sysroot,
    numa,
    numa_nodes,
) -> None:
    """Generate text after PROMPT, streaming it to stdout; timings go to stderr."""
    from refengine.chat import prompt_token_ids
    from refengine.generate import generate as run_generation
    from refengine.sampler import Sampler
    from refengine.session import PeakAnon

    peak = click.get_current_context().with_resource(PeakAnon())  # the whole run: load, prefill, decode
    source = model  # the name, or the file the plan has opened already
    if not no_plan:
        # A token is at least one byte of text; a chat template adds a few hundred bytes at most.
        text_bytes = len(prompt.encode(errors="surrogateescape")) + len((system or "").encode(errors="surrogateescape"))
        max_prompt_tokens = text_bytes + (512 if chat else 8)
        source = preflight(model, ctx, precision, sysroot, max_prompt_tokens=max_prompt_tokens, numa=numa)
    sampler = Sampler(sampling)
    numerics = numerics_of(numerics, precision, "ggml")
    session = load_session(source, precision, numa, numa_nodes, sysroot, numerics, cache_type_of(cache_type, numerics))
    prompt_ids = prompt_token_ids(session.gguf, session.tokenizer, prompt, chat, system)
    if len(prompt_ids) + n_predict > ctx:
        raise UserError(
            f"the prompt ({len(prompt_ids)} tokens) plus -n {n_predict} exceeds --ctx {ctx}; raise --ctx or lower -n"
        )
    cache = session.new_cache(ctx)

    def on_text(text: str) -> None:
        if not as_json:
            click.echo(text, nl=False)

    result = run_generation(session.model, session.tokenizer, cache, prompt_ids, n_predict, sampler, stop, on_text)
    result.timings.load_s = session.load_s
    peak_anon = peak.sample()
    t = result.timings
    if as_json:
        meta = click.get_current_context().meta
        runtime, ranks = meta.get("refengine.numa"), meta.get("refengine.mpi")
        numa_report = {"numa": runtime.as_dict()} if runtime is not None else {}
        mpi_report = {"ranks": ranks()} if ranks is not None else {}  # each rank's experts in its page cache
        click.echo(json.dumps({**result.as_dict(), "peak_rss_anon": peak_anon, **numa_report, **mpi_report}))
    else:
        click.echo()
        click.echo(
            f"load {t.load_s:.2f} s | prompt {t.n_prompt} tok, {t.prompt_tok_s:.1f} tok/s | "
            f"generated {t.n_generated} tok, {t.generation_tok_s:.1f} tok/s | "
            f"peak RssAnon {peak_anon / 2**20:.0f} MiB | {result.finish_reason}",
            err=True,
        )
    if result.finish_reason == "interrupted":
        raise KeyboardInterrupt


@cli.command(epilog=MODEL_HELP)
@MODEL_OPTION
@click.option(
    "-n",
    "--n-predict",
    "n_predict",
    default=512,
    show_default=True,
    type=click.IntRange(min=1),
    help="Tokens to generate at most per reply.",
)
@CTX_OPTION
@sampler_options
@click.option("--system", default=None, metavar="TEXT", help="System message.")
@PRECISION_OPTION
@numerics_option("ggml")
def chat(model, n_predict, ctx, sampling, system, precision, numerics, cache_type) -> None:
    """Talk with the model. The KV cache is kept across turns; an empty line or Ctrl-D ends."""
    from refengine.chat import Conversation
    from refengine.sampler import Sampler
    from refengine.session import Session

    sampler = Sampler(sampling)
    numerics = numerics_of(numerics, precision, "ggml")
    session = Session.load(model, precision, numerics, cache_type_of(cache_type, numerics))
    conversation = Conversation(session.model, session.tokenizer, session.gguf, session.new_cache(ctx), system)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        result = conversation.reply(line, n_predict, sampler, on_text=lambda text: click.echo(text, nl=False))
        click.echo()
        if result.finish_reason == "interrupted":
            raise KeyboardInterrupt


@cli.group(context_settings=CONTEXT)
def bench() -> None:
    """Benchmarks."""


@bench.command("model", epilog=MODEL_HELP)
@click.argument("model", default=DEFAULT_MODEL, metavar="MODEL")
@click.option(
    "-p", "--n-prompt", default=512, show_default=True, type=click.IntRange(min=0), help="ppN tokens (0: skip)."
)
@click.option("-n", "--n-gen", default=128, show_default=True, type=click.IntRange(min=0), help="tgN tokens (0: skip).")
@click.option(
    "-d",
    "--n-depth",
    "depth",
    multiple=True,
    type=click.IntRange(min=0),
    help="Tokens already in the cache before each test, as llama-bench's -d (repeatable; default 0).",
)
@click.option(
    "-r", "--repetitions", default=3, show_default=True, type=click.IntRange(min=1), help="Timed runs per test."
)
@PRECISION_OPTION
@numerics_option("ggml")
@click.option("--json", "as_json", is_flag=True, help="Print llama-bench-style JSON records.")
@numa_options
def bench_model_command(
    model, n_prompt, n_gen, depth, repetitions, precision, numerics, cache_type, as_json, numa, numa_nodes
) -> None:
    """Prompt processing and generation speed, as llama-bench reports them."""
    from refengine.bench import bench_model, markdown

    numerics = numerics_of(numerics, precision, "ggml")
    session = load_session(
        model, precision, numa, numa_nodes, numerics=numerics, cache_type=cache_type_of(cache_type, numerics)
    )
    records = [r for d in depth or (0,) for r in bench_model(session, n_prompt, n_gen, repetitions, precision, d)]
    click.echo(json.dumps([r.as_dict() for r in records], indent=2) if as_json else markdown(records))


BENCH_KERNELS_EPILOG = """\b
Every figure comes from the same passes over data larger than the last-level cache: the read
bandwidth is a sum over the same bytes, in chunks of one call's input; each call's best time over
the passes is kept (noise only slows a call down). Examples:
  refengine bench kernels --types Q4_K,Q6_K --vs-ggml        matvec, both numerics, beside ggml
  refengine bench kernels --op dequant --types Q8_0 --json
  refengine bench kernels --numerics ggml --shape 262144x640 --types Q8_0   gemma3's output head"""


def parse_shape(ctx, param, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        n_out, n_in = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not N_OUTxN_IN, e.g. 2048x640") from None
    if n_out < 1 or n_in < 1:
        raise click.BadParameter(f"{value!r}: both sizes must be positive")
    return n_out, n_in


@bench.command("kernels", epilog=BENCH_KERNELS_EPILOG)
@click.option("--op", type=click.Choice(["matvec", "dequant", "quantize"]), default="matvec", show_default=True)
@click.option("--types", metavar="LIST", help="Comma-separated ggml types, e.g. Q4_K,Q6_K (default: every kernel).")
@click.option(
    "--numerics",
    type=click.Choice(["exact", "ggml", "both"]),
    default="both",
    show_default=True,
    help="matvec: exact float32 kernels, llama.cpp's integer arithmetic, or both in the same passes.",
)
@click.option("--vs-ggml", is_flag=True, help="Also run ggml's own kernels (libggml through ctypes) and the ratio.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads (default: numba's, every CPU).")
@click.option("--size-mb", type=click.IntRange(min=1), default=None, help="MB streamed per type (default: >= 16 x L3).")
@click.option("--budget", type=click.FloatRange(min=0), default=2.0, show_default=True, help="Seconds per type.")
@click.option("--shape", callback=parse_shape, metavar="N_OUTxN_IN", help="matvec weight shape (default: gemma3's).")
@click.option("--json", "as_json", is_flag=True, help="Print the run as one JSON object.")
def bench_kernels_command(op, types, numerics, vs_ggml, threads, size_mb, budget, shape, as_json) -> None:
    """GB/s of the dequantize, matvec and quantize kernels per type, as a percentage of the read
    bandwidth measured in the same run, the per-call overhead, and with --vs-ggml ggml's own."""
    import contextlib

    from refengine.benchkernels import bench_kernels, markdown, parse_types

    numerics_list = ["exact", "ggml"] if numerics == "both" else [numerics]
    chosen = parse_types(op, types, numerics_list)
    with contextlib.ExitStack() as stack:
        progress = chunk_progress(stack, f"bench {op}")
        run = bench_kernels(
            op, chosen, numerics_list, vs_ggml, threads, size_mb, budget, shape, on_done=lambda i, n: progress(i, n)
        )
    click.echo(json.dumps(run.as_dict(), indent=2) if as_json else markdown(run))


@cli.command("numa", epilog=MODEL_HELP)
@MODEL_ARGUMENT
@numa_options
@click.option("--sysroot", type=SYSROOT_OPTION_TYPE, default=Path("/"), hidden=True)  # as refengine plan's
@click.option("--json", "as_json", is_flag=True, help="Print a list of nodes with their bytes per tensor group.")
def numa_command(model: str, numa: str, numa_nodes, sysroot: Path, as_json: bool) -> None:
    """Where MODEL's pages live: bytes per NUMA node and tensor group, read back from the kernel
    (move_pages), and the bytes not in memory: numastat for one model. Reads no page from disk.

    --numa shard or split first places the model as generate does under that mode, then reads it back;
    the pages stay where they were put after this command ends, until the kernel evicts them.
    """
    from refengine.numa import ModelPages, NumaRuntime, render_residency, residency, warn
    from refengine.system import read_system

    system = read_system(sysroot)
    gguf_file = open_model_file(model)
    runtime = NumaRuntime(numa, system, numa_nodes)
    try:
        warn(runtime.attach(gguf_file))
        with ModelPages(gguf_file) as pages:
            result = residency(pages, runtime.nodes or [n.id for n in system.memory_nodes])
    finally:
        runtime.close()
    placed = None if runtime.report is None else runtime.report.as_dict()
    if as_json:
        click.echo(json.dumps({**result.as_dict(), "numa": numa, "placement": placed}, indent=2))
    else:
        click.echo(render_residency(result, runtime.report))


QUANTIZE_EPILOG = """\b
MIX is one of llama.cpp's mixes, chosen per tensor by its rules:
  Q4_0 Q4_1 Q5_0 Q5_1 Q8_0   that type everywhere (Q6_K for the output, if Q8_0 is not the mix)
  Q2_K Q3_K_S Q3_K_M Q3_K_L  Q2_K or Q3_K, with more bits for attn_v, ffn_down, attn_output
  Q4_K_S Q4_K_M              Q4_K; _M gives Q6_K to about half the attn_v and ffn_down layers
  Q5_K_S Q5_K_M Q6_K         Q5_K (likewise) or Q6_K
1-D tensors and norms stay as they are; rows that are not whole blocks get a smaller block type.
IN must be F32, F16 or BF16 wherever the mix changes a tensor's type."""


@cli.command(epilog=QUANTIZE_EPILOG)
@click.argument("input_path", metavar="IN", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("output_path", metavar="OUT", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-t", "--type", "mix", required=True, type=click.Choice(list(MIXES)), help="The quantization mix.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def quantize(input_path: Path, output_path: Path, mix: str, as_json: bool) -> None:
    """Quantize the GGUF model IN into OUT, byte for byte as llama.cpp's llama-quantize does."""
    import contextlib

    from refengine.quantize import quantize_file

    with contextlib.ExitStack() as stack:
        bar = None

        def progress(done: int, total: int) -> None:
            nonlocal bar
            if bar is None:  # the total is known once IN is open
                bar = stack.enter_context(click.progressbar(length=total, label=f"{mix}", file=sys.stderr))
            bar.update(done - bar.pos)

        # no bar when stderr is a log file or a pipe: click would leave its label there unterminated
        report = quantize_file(input_path, output_path, mix, on_progress=progress if sys.stderr.isatty() else None)
    if as_json:
        click.echo(json.dumps(report.as_dict()))
    else:
        types = ", ".join(f"{name} {count}" for name, count in sorted(report.types.items()))
        click.echo(
            f"{output_path}: {mix}, {sum(report.types.values())} tensors ({types}); "
            f"{report.input_bytes / 1e6:.1f} MB of tensors -> {report.output_bytes / 1e6:.1f} MB file "
            f"in {report.seconds:.1f} s ({report.mb_per_s:.0f} MB/s of input)"
        )


def chunk_progress(stack, label: str):
    """on_chunk(i, n_chunk) drawing a progress bar on stderr when it is a terminal (else nothing: a log file
    would keep the bar's label unterminated)."""
    bar = None

    def update(i: int, n_chunk: int) -> None:
        nonlocal bar
        if not sys.stderr.isatty():
            return
        if bar is None:
            bar = stack.enter_context(click.progressbar(length=n_chunk, label=label, file=sys.stderr))
        bar.update(i + 1 - bar.pos)

    return update


PERPLEXITY_EPILOG = """\b
As llama.cpp's llama-perplexity: the text tokenized with BOS, cut into chunks of --ctx tokens, each
chunk's first token replaced by BOS, the second half of each chunk scored. Output: the running PPL
after each chunk ([1]x,[2]y,...) and `Final estimate: PPL = x +/- y`.
  perplexity -m M -f TEXT --kl-divergence-base B      also writes llama.cpp's base file B
  perplexity -m M --kl-divergence-base B --kl-divergence   scores M against B (its tokens and n_ctx)
B files are read and written by llama-perplexity too. MODEL: a .gguf path or gemma3-270m, smollm2-135m."""


@cli.command("perplexity", epilog=PERPLEXITY_EPILOG)
@MODEL_OPTION
@click.option(
    "-f",
    "--file",
    "text_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The text, read verbatim (less one trailing newline). Not used with --kl-divergence.",
)
@click.option(
    "-c", "--ctx", default=512, show_default=True, type=click.IntRange(min=4), help="Tokens per chunk (n_ctx)."
)
@click.option("--chunks", type=click.IntRange(min=1), default=None, help="Score at most N chunks (default: all).")
@click.option(
    "--kl-divergence-base",
    "base_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE",
    help="llama.cpp's log-probability file: written from this run, or read with --kl-divergence.",
)
@click.option("--kl-divergence", "kl_divergence", is_flag=True, help="Score MODEL against --kl-divergence-base.")
@PRECISION_OPTION
@numerics_option("exact")
@click.option("--json", "as_json", is_flag=True, help="Print every figure as one JSON object.")
def perplexity_command(
    model, text_file, ctx, chunks, base_file, kl_divergence, precision, numerics, cache_type, as_json
) -> None:
    """Perplexity of a text, and KL divergence against a base model, exactly as llama-perplexity."""
    import contextlib

    if kl_divergence and base_file is None:
        raise click.UsageError("--kl-divergence needs --kl-divergence-base FILE")
    if not kl_divergence and text_file is None:
        raise click.UsageError("-f TEXT is required (except with --kl-divergence)")
    # through load_session, so that under mpirun the ranks share the experts (refengine.distributed)
    from refengine.api import Model

    numerics = numerics_of(numerics, precision, "exact")
    session = load_session(
        model, precision, "off", None, numerics=numerics, cache_type=cache_type_of(cache_type, numerics)
    )
    loaded = Model(session, precision)
    if base_file is not None and not kl_divergence:
        inputs = [text_file, *loaded.session.gguf.splits]
        if any(_same_file(base_file, p) for p in inputs):
            raise UserError(f"--kl-divergence-base {base_file} is an input file; refusing to overwrite it")
    record = {"model": model, "precision": precision}
    with contextlib.ExitStack() as stack:
        progress = chunk_progress(stack, "perplexity" if not kl_divergence else "KL divergence")
        if kl_divergence:
            from refengine.kld import open_logits_file

            base = open_logits_file(base_file)
            n_chunk = base.n_chunk if chunks is None else min(chunks, base.n_chunk)
            report = loaded.kl_divergence(base_file, chunks, on_chunk=lambda i, stats: progress(i, n_chunk))
        else:
            from refengine.perplexity import read_text

            result = loaded.perplexity(
                read_text(text_file), ctx, chunks, base_file, on_chunk=lambda i, r: progress(i, r.n_chunk)
            )
    if kl_divergence:
        record.update(n_ctx=base.n_ctx, n_chunk=n_chunk, kl_divergence_base=str(base_file), **report.as_dict())
        click.echo(json.dumps(record) if as_json else report.render())
    elif as_json:
        click.echo(json.dumps({**record, **result.as_dict(), "kl_divergence_base": base_file and str(base_file)}))
    else:
        click.echo("".join(f"[{i + 1}]{ppl:.4f}," for i, ppl in enumerate(result.chunk_ppl)))
        click.echo(result.final_line())


@cli.command("trace", epilog=MODEL_HELP)
@MODEL_OPTION
@click.option("-p", "--prompt", default=None, metavar="TEXT", help="Text, tokenized as llama.cpp does (BOS included).")
@click.option("--tokens", default=None, metavar="IDS", help="Comma-separated token ids, evaluated as given.")
@click.option(
    "--out", "output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The .npz to write."
)
@click.option("--filter", "pattern", default=None, metavar="REGEX", help="Keep tensors whose name matches (re.search).")
@click.option(
    "--positions", type=click.Choice(["all", "last"]), default="all", show_default=True, help="Positions kept."
)
@PRECISION_OPTION
@numerics_option("exact")
@click.option("--json", "as_json", is_flag=True, help="Print each tensor's name, shape and sum as JSON.")
def trace_command(model, prompt, tokens, output, pattern, positions, precision, numerics, cache_type, as_json) -> None:
    """Write every intermediate tensor of one forward pass, by llama.cpp's graph names (inp_embd,
    attn_norm-0, Qcur-0, ..., l_out-N, result_norm, result_output), to line up with llama-eval-callback."""
    import refengine
    from refengine.trace import compile_filter

    if (prompt is None) == (tokens is None):
        raise click.UsageError("give one of -p PROMPT or --tokens IDS")
    compile_filter(pattern)  # a bad regex fails before the model loads
    numerics = numerics_of(numerics, precision, "exact")
    loaded = refengine.load(model, precision, numerics, cache_type_of(cache_type, numerics))
    ids = loaded.tokenize(prompt) if prompt is not None else parse_token_list(tokens)
    traced = loaded.trace(ids, filter=pattern, positions=positions)
    if any(_same_file(output, p) for p in loaded.session.gguf.splits):
        raise UserError(f"--out {output} is the model file itself; refusing to overwrite it")
    traced.save(output)
    if as_json:
        click.echo(json.dumps({"tokens": [int(t) for t in ids], "output": str(output), "tensors": traced.summary()}))
    else:
        for row in traced.summary():
            click.echo(f"{row['name']:24} {'x'.join(map(str, row['shape'])):>20} sum = {row['sum']:.6f}")
        click.echo(f"{len(traced)} tensors of {len(ids)} tokens -> {output}", err=True)


@cli.command("compare")
@click.argument("a", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("b", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="NMSE past which a tensor diverges (default 1e-6, llama.cpp's 'essentially identical'); "
    "against an eval-callback log, the relative difference of sums (default 1e-3).",
)
@click.option("--json", "as_json", is_flag=True, help="Print every tensor's figures as JSON.")
def compare_command(a: Path, b: Path, threshold: float | None, as_json: bool) -> None:
    """Compare A with the reference B, tensor by tensor, and name the first that diverges.

    A and B: two traces (refengine trace), two logits files (.npy, refengine logits), a trace and a
    logits file, or a trace and a llama-eval-callback log (its stdout). Per tensor: NMSE, max |diff| and
    where (position, index), cosine; for logits also KL and top-1 agreement per position."""
    from refengine.compare import compare_files

    result = compare_files(a, b, threshold)
    click.echo(json.dumps(result.as_dict()) if as_json else result.render())


def write_npy(output: Path, array, gguf_file: GGUFFile) -> None:
    """np.save through refengine.files.atomic_output: an interrupted run leaves no half-written file,
    and a model file is never the target."""
    import numpy as np

    from refengine.files import atomic_output

    if any(_same_file(output, p) for p in gguf_file.splits):
        raise UserError(f"--output {output} is the model file itself; refusing to overwrite it")
    with atomic_output(output) as fh:
        np.save(fh, array)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and turn every expected failure into one line on stderr."""
    import numpy as np

    from refengine.signals import guard

    prog = "refengine"
    # numpy's floating-point warnings would add lines to stderr: a result that is not finite is
    # reported on its own, in one line (refengine.sampler.NonFiniteLogits)
    with guard() as signals, np.errstate(all="ignore"):
        try:
            cli.main(args=argv, prog_name=prog, standalone_mode=False)
        except click.exceptions.Exit as e:  # --help, --version
            return e.exit_code
        except click.UsageError as e:
            command = e.ctx.command_path if e.ctx else prog
            click.echo(f"{command}: error: {one_line(e.format_message())} (see '{command} -h')", err=True)
            return EXIT_USAGE
        except click.ClickException as e:
            click.echo(f"{prog}: error: {one_line(e.format_message())}", err=True)
            return e.exit_code
        except DoesNotFit as e:
            click.echo(f"{prog}: error: {one_line(e)}", err=True)
            return EXIT_DOES_NOT_FIT
        except RefengineError as e:
            click.echo(f"{prog}: error: {one_line(e)}", err=True)
            return EXIT_ERROR
        except (KeyboardInterrupt, click.exceptions.Abort):
            # Ctrl-C, or SIGTERM, which refengine.signals turns into the same clean stop
            return stopped(prog, signals.received)
        except BrokenPipeError:
            # The reader went away (e.g. `refengine info --tensors | head`): not an error.
            sys.stderr.close()
            return 0
        except Exception:
            if signals.received is None:
                raise  # a bug in refengine: it keeps its traceback
            # raised by code the signal interrupted (numba half-way through compiling a kernel, say)
            return stopped(prog, signals.received)
    return 0


def stopped(prog: str, signum: int | None) -> int:
    """The line and exit status for a command stopped by Ctrl-C (130) or SIGTERM (143)."""
    signum = signum or signal.SIGINT
    click.echo(f"{prog}: {'terminated' if signum == signal.SIGTERM else 'interrupted'}", err=True)
    return EXIT_INTERRUPTED - signal.SIGINT + signum


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
