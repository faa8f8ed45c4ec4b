"""The ``charlstm`` command: train, sample, eval, serve, plot, compare, inspect and export.

Flags are generated from the configuration dataclasses, so the CLI, config files and
checkpoints cannot drift apart. This is the only module that turns errors into exit codes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import signal
import sys
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from charlstm import distributed
from charlstm.config import (
    CELLS,
    COMPARE_BUDGET,
    COMPARE_CELLS,
    EXPORT_FORMATS,
    INSPECT_MAX_CHARS,
    ONNX_OPSET,
    UNKNOWN_POLICIES,
    DynamicEvalConfig,
    RunConfig,
    SampleConfig,
    load_config_file,
)
from charlstm.errors import CharLSTMError, TrainingInterrupted
from charlstm.plot import CURVES_FILE, plot_runs  # numpy, and matplotlib only to draw
from charlstm.presets import AUTO, picks_preset
from charlstm.sample_cli import interactive, read_prompt_file, write_samples

if TYPE_CHECKING:
    from charlstm.evaluation import EvalResult
    from charlstm.lm import CharLM

# Each command imports the modules that load torch when it runs (2-3 s on a small CPU), so that
# --help, usage mistakes and settings the configuration rejects answer at once.

EXIT_USAGE = 2
EXIT_FAILURE = 1  # the input was fine but the machine could not run it (out of memory)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM
EXIT_STATUSES = (
    "exit status: 0 done; 2 a usage mistake or input that cannot be used (one 'error:' line "
    "says what and where); 1 the machine could not run it (out of memory) or an unexpected "
    "failure; 130 stopped by Ctrl-C and 143 by SIGTERM (train saves last/ first, serve lets "
    "running requests finish)"
)
# The defaults of charlstm.server.ServeLimits (a test keeps them equal), here so that `serve
# --help` answers without importing FastAPI and torch.
SERVE_DEFAULTS = {"max_tokens": 2000, "max_prompt": 10_000, "max_n": 16, "max_sequences": 64,
                  "drain_timeout": 10.0}  # fmt: skip
# What each command can make smaller when it runs out of memory.
_SMALLER = {
    "train": "use a smaller --hidden-dim, --n-layers, --embed-dim, --batch-size or --seq-len",
    "compare": "use a smaller --hidden-dim, --n-layers, --embed-dim, --batch-size or --seq-len",
    "sample": "use a smaller --num-samples or a shorter --prompt",
    "eval": "with --dynamic, use a smaller --dynamic-segment; or --device cpu",
    "inspect": "use a smaller --max-chars",
    "serve": "use a smaller --max-sequences or --max-prompt",
    "plot": "plot fewer runs at once",
    "export": "export on a machine with more memory",
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one ``error:`` line like every other error."""

    def error(self, message: str) -> NoReturn:
        # Under torchrun, rank 0 speaks for every process.
        distributed.report(f"error: {message} (see '{self.prog} --help')")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    """The full command-line parser, flags generated from the config dataclasses."""
    parser = _Parser(
        prog="charlstm",
        description="Character-level LSTM / GRU / RNN language models: train, sample, eval, "
        "serve, plot, compare, inspect, export.",
        epilog=EXIT_STATUSES,
    )
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train_cmd = commands.add_parser(
        "train",
        help="train a model (default: 5 minutes on the built-in Shakespeare corpus)",
        description="Train a model, then print a sample from its best checkpoint.",
    )
    # The flags most runs need come first; the rest, by section, under "advanced".
    sections = [section.default_factory for section in dataclasses.fields(RunConfig)]
    essential = train_cmd.add_argument_group("essential settings")
    for cls in sections:
        _add_dataclass_flags(essential, cls, only=lambda f: f.metadata.get("essential", False))  # type: ignore[arg-type]
    essential.add_argument(
        "--config", metavar="FILE.toml", help="read settings from a TOML file (flags win)"
    )
    essential.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar or messages: only warnings, errors and the closing line",
    )
    for section in dataclasses.fields(RunConfig):
        group = train_cmd.add_argument_group(f"advanced {section.name} settings")
        _add_dataclass_flags(
            group, section.default_factory, only=lambda f: not f.metadata.get("essential", False)
        )  # type: ignore[arg-type]

    sample_cmd = _add_sample_command(commands)

    eval_cmd = commands.add_parser(
        "eval",
        help="measure a checkpoint's loss on text",
        description="Print loss (nats/char), bits/char and perplexity over whole files, or "
        "over the validation split the model was trained with.",
    )
    eval_cmd.add_argument("checkpoint", help="checkpoint directory or run directory")
    eval_cmd.add_argument(
        "--data",
        nargs="+",
        help="files to evaluate on (default: the validation split of the model's training data)",
    )
    eval_cmd.add_argument("--encoding", help="text encoding (default: the model's, UTF-8)")
    eval_cmd.add_argument(
        "--unknown",
        choices=("error", "skip", "replace"),
        default="error",
        help="characters outside the model's vocabulary: error, skip or replace them",
    )
    eval_cmd.add_argument(
        "--dynamic",
        action="store_true",
        help="dynamic evaluation: the model keeps learning from the text it has scored",
    )
    _add_dataclass_flags(eval_cmd, DynamicEvalConfig)
    eval_cmd.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_device_flag(eval_cmd)

    serve_cmd = _add_serve_command(commands)
    analysis_cmds = _add_analysis_commands(commands)  # plot, compare, inspect
    export_cmd = _add_export_command(commands)
    for sub in (train_cmd, sample_cmd, eval_cmd, serve_cmd, *analysis_cmds, export_cmd):
        sub.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    _prefer_sleeping_openmp_threads()
    try:
        return _main(argv)
    finally:
        if argv is None:  # this process is the command (not a caller's test or script)
            _quiet_second_interrupt()


def _prefer_sleeping_openmp_threads() -> None:
    """Idle OpenMP threads sleep at once instead of spinning first (unless the user chose a
    policy): spinning threads of two processes sharing a CPU starve each other's work. It
    counts only if set before torch loads its OpenMP runtime, which the commands import later."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    sys.stdout.reconfigure(errors="replace")  # type: ignore[union-attr]
    try:
        handlers = {"train": _train, "sample": _sample, "eval": _eval, "serve": _serve}
        handlers.update(plot=_plot, compare=_compare, inspect=_inspect, export=_export)
        # Training and serving stop on SIGTERM in their own way (saving, draining).
        own = args.command in ("train", "compare", "serve")
        with contextlib.nullcontext() if own else _sigterm_stops_like_ctrl_c():
            code = handlers[args.command](args)
        sys.stdout.flush()  # a closed pipe must show up here, not in Python's flush at exit
        distributed.shutdown()  # leave the torchrun process group, if this process joined one
        return code
    except CharLSTMError as e:
        if args.debug:
            raise
        # Under torchrun every process fails (non-zero) but only rank 0 prints the line.
        distributed.report(f"error: {e}")
        distributed.shutdown()  # a process group left to the interpreter's exit can abort it
        return EXIT_USAGE
    except TrainingInterrupted as e:
        under = " (in the same torchrun command)" if distributed.launched() else ""
        distributed.report(f"{e}; continue with: charlstm train --resume {e.run_dir}{under}")
        distributed.shutdown()
        return e.exit_code
    except KeyboardInterrupt as e:
        terminated = isinstance(e, _Terminated)
        _say("terminated" if terminated else "interrupted")
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except (MemoryError, RuntimeError) as e:
        if args.debug or not _out_of_memory(e):
            raise
        distributed.report(f"error: out of memory in charlstm {args.command}: {_smaller(args)}")
        distributed.shutdown()
        return EXIT_FAILURE
    except BrokenPipeError:  # e.g. `charlstm sample ... | head`
        # Python flushes stdout again at exit; point it at /dev/null so that cannot fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _train(args: argparse.Namespace) -> int:
    world = distributed.world()  # joins the process group when started by torchrun
    overrides = load_config_file(args.config) if args.config else {}
    overrides.update(_given(args, RunConfig))
    base = RunConfig().with_overrides(overrides)
    if base.session.resume is None:
        base.validate()  # a fresh run's settings; a resumed run's are its saved ones, later
    else:
        base.session.validate()  # the flags given with --resume (e.g. --overwrite), before any file
    from charlstm.checkpoint import read_checkpoint
    from charlstm.run_dir import find_resume_checkpoint
    from charlstm.training import train

    with world.failures():
        resume_from = find_resume_checkpoint(base.session)
    if resume_from is not None:
        # A resumed run keeps its saved settings; only the flags given now change them (the
        # --overwrite it may have started with replaced nothing that --resume continues).
        base = read_checkpoint(resume_from).config.with_overrides({"overwrite": False, **overrides})
    else:
        _check_memory("train", base)
        if picks_preset(overrides):  # learning settings left open: the preset for this machine
            base = base.with_overrides({"preset": AUTO, **overrides})
    result = train(base, progress=not args.quiet, quiet=args.quiet)
    length = base.session.sample_length
    if length and result.model is not None:  # under torchrun, rank 0 alone samples
        if not args.quiet:
            print(f"sample from {result.run_dir / 'best'}:", file=sys.stderr)
        # From a newline, or its stand-in when the training text had none (a one-line file).
        write_samples(result.model, SampleConfig(length=length), sys.stdout)
    return 0


def _add_sample_command(commands: Any) -> argparse.ArgumentParser:
    """The sample subcommand: SampleConfig's flags, then where the prompt comes from and how
    the samples are printed."""
    sample_cmd = commands.add_parser(
        "sample",
        help="generate text from a checkpoint",
        description="Generate text. A prompt you give is printed before its continuation "
        "(--no-echo prints the continuation alone, for scripts); --json prints one JSON object "
        "per sample instead; --interactive samples one prompt per line of standard input.",
        epilog=EXIT_STATUSES,
    )
    sample_cmd.add_argument("checkpoint", help="checkpoint directory or run directory")
    _add_dataclass_flags(sample_cmd, SampleConfig)
    sample_cmd.add_argument(
        "--prompt-file",
        metavar="FILE",
        help="read the prompt from a UTF-8 file, exactly as it is ('-': standard input); "
        "instead of --prompt",
    )
    sample_cmd.add_argument(
        "--no-echo",
        dest="echo",
        action="store_false",
        help="print the continuation alone (default: the prompt, then its continuation; the "
        "default newline prompt is never printed)",
    )
    sample_cmd.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per sample and line (JSON Lines) and nothing else: prompt, "
        "text (the continuation), settings, seed (drawn if not given), index and model",
    )
    sample_cmd.add_argument(
        "--interactive",
        action="store_true",
        help="load the model once, then sample each line of standard input as a prompt until "
        "it ends; lines such as ':temperature 0.5', ':length 200', ':seed 7' change the "
        "settings, ':help' lists them",
    )
    _add_device_flag(sample_cmd)
    return sample_cmd


def _sample(args: argparse.Namespace) -> int:
    given = _given(args, SampleConfig)
    if args.prompt_file is not None and "prompt" in given:
        raise CharLSTMError("give --prompt or --prompt-file, not both")
    if args.interactive and (args.prompt_file is not None or "prompt" in given):
        raise CharLSTMError(
            "--interactive reads its prompts from standard input, one per line: give no "
            "--prompt or --prompt-file"
        )
    if args.interactive and sys.stdin is None:
        raise CharLSTMError("standard input is closed: --interactive reads its prompts there")
    if args.prompt_file is not None:
        given["prompt"] = read_prompt_file(args.prompt_file)
    settings = SampleConfig(**given)
    settings.validate()
    from charlstm.lm import CharLM

    model = CharLM.load(args.checkpoint, device=args.device)
    if args.interactive:
        interactive(model, settings, sys.stdin.buffer, sys.stdout, sys.stderr,
                    echo=args.echo, as_json=args.json)  # fmt: skip
    else:
        write_samples(model, settings, sys.stdout, echo=args.echo, as_json=args.json)
    return 0


def _eval(args: argparse.Namespace) -> int:
    given = _given(args, DynamicEvalConfig)
    if given and not args.dynamic:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise CharLSTMError(f"{flags} set dynamic evaluation; add --dynamic to use it")
    if args.encoding and args.data is None:
        raise CharLSTMError("--encoding applies to --data files; give the files too")
    settings = DynamicEvalConfig(**given)
    settings.validate()
    dynamic = settings if args.dynamic else False
    from charlstm.lm import CharLM

    model = CharLM.load(args.checkpoint, device=args.device)
    with _progress("scoring", "char") as progress:
        if args.data is None:
            result = _evaluate_validation(model, dynamic, progress)
            scored = "of the validation split"
        else:
            result = model.evaluate_files(
                args.data,
                encoding=args.encoding,
                unknown=args.unknown,
                dynamic=dynamic,
                progress=progress,
            )
            scored = "of " + ", ".join(args.data)
    if not math.isfinite(result.loss):
        hint = "a smaller --dynamic-lr" if args.dynamic else "an earlier checkpoint of the run"
        raise CharLSTMError(
            f"the loss {scored} came out as {result.loss} (the model's predictions overflowed): "
            f"try {hint}"
        )
    if args.json:
        # JSON has no NaN or Infinity: an overflowed perplexity is null.
        values = {k: v if not isinstance(v, float) or math.isfinite(v) else None
                  for k, v in result.as_dict().items()}  # fmt: skip
        print(json.dumps({**values, "dynamic": args.dynamic}, allow_nan=False))
    else:
        how = "dynamic evaluation: " if args.dynamic else ""
        print(
            f"{how}loss {result.loss:.4f} nats/char  {result.bpc:.4f} bits/char  "
            f"perplexity {result.perplexity:.3f}  over {result.characters:,} characters {scored}"
        )
    return 0


def _evaluate_validation(
    model: CharLM, dynamic: DynamicEvalConfig | bool, progress: Callable[[int], object]
) -> EvalResult:
    try:
        return model.evaluate_validation(dynamic, progress)
    except CharLSTMError as e:  # most likely, the training text has moved or changed
        raise CharLSTMError(
            f"{e}; without --data, eval reads the validation split from the files the model "
            "was trained on: give --data FILE to score other text"
        ) from None


# ---- serve ----------------------------------------------------------------------------------


def _add_serve_command(commands: Any) -> argparse.ArgumentParser:
    """The serve subcommand: its flags are ServeLimits' fields, host, port and device."""
    serve_cmd = commands.add_parser(
        "serve",
        help="serve a model over HTTP: an OpenAI-compatible API and a playground page",
        description="Serve a checkpoint: POST /v1/completions (the OpenAI Completions API, "
        "streamed or not), GET /v1/models, GET /health, and a playground page at /. Needs "
        "the serve extra: pip install 'charlstm[serve]'. SIGTERM drains, then exits 143.",
    )
    serve_cmd.add_argument("checkpoint", help="checkpoint directory or run directory")
    serve_cmd.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; another address "
        "lets other machines in, without authentication)",
    )
    serve_cmd.add_argument(
        "--port",
        type=_bounded(int, 0, 65535),
        default=8000,
        help="TCP port; 0 picks a free one (default: 8000)",
    )
    for flag, kind, low, what in (
        ("--max-tokens", int, 1, "characters one completion may ask for"),
        ("--max-prompt", int, 1, "characters of one prompt"),
        ("--max-n", int, 1, "completions one request may ask for (n times the prompts)"),
        ("--max-sequences", int, 1, "sequences generated at once; a request beyond them gets 429"),
        ("--drain-timeout", float, 0, "seconds running requests get to finish on SIGTERM"),
    ):
        default = SERVE_DEFAULTS[flag[2:].replace("-", "_")]
        serve_cmd.add_argument(
            flag, type=_bounded(kind, low), default=default, help=f"{what} (default: {default})"
        )
    serve_cmd.add_argument(
        "--unknown",
        choices=UNKNOWN_POLICIES,
        default="error",
        help="prompt characters outside the model's vocabulary: error (a 400 naming them), "
        "skip or replace them (default: error)",
    )
    _add_device_flag(serve_cmd)
    return serve_cmd


def _bounded(kind: type, low: float, high: float = math.inf) -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` in [low, high], so that a flag out of range is a
    usage error answered at once, before the server's imports load torch."""

    def parse(text: str) -> Any:
        value = kind(text)  # a ValueError: argparse says "invalid int value"
        if not (low <= value <= high and math.isfinite(value)):
            bound = f"at least {low}" if high == math.inf else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _serve(args: argparse.Namespace) -> int:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise CharLSTMError(
            f"charlstm serve needs {' and '.join(missing)}: pip install 'charlstm[serve]'"
        )
    from charlstm.server import ServeLimits, serve

    limits = ServeLimits(
        max_tokens=args.max_tokens,
        max_prompt=args.max_prompt,
        max_n=args.max_n,
        max_sequences=args.max_sequences,
        unknown=args.unknown,
        drain_timeout=args.drain_timeout,
    )
    return serve(args.checkpoint, args.host, args.port, limits, device=args.device)


# ---- plot, compare, inspect -----------------------------------------------------------------

# Train flags that compare sets itself (cell), replaces (time-budget: its own default) or has
# no use for (no sample is printed; every cell is a new model, not a fine-tuned one).
_COMPARE_SKIPS = frozenset(
    {"cell", "time_budget", "sample_length", "init_from", "unknown", "extend_vocab"}
)


def _add_analysis_commands(commands: Any) -> list[argparse.ArgumentParser]:
    """The plot, compare and inspect subcommands."""
    plot_cmd = commands.add_parser(
        "plot",
        help="draw runs' loss curves into a PNG",
        description="Draw training and validation bits per character against steps and wall "
        "time, several runs overlaid.",
    )
    plot_cmd.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    plot_cmd.add_argument(
        "--out", default=CURVES_FILE, help=f"PNG file to write (default: {CURVES_FILE})"
    )
    plot_cmd.add_argument("--labels", nargs="+", help="legend names, one per run directory")
    plot_cmd.add_argument("--title", help="title above the plot")

    compare_cmd = commands.add_parser(
        "compare",
        help="train rnn, gru and lstm with equal settings and budget; table and plot them",
        description="Train each cell with the same settings and wall-clock budget into "
        "OUT/<cell>/, then print a table and write OUT/compare.png, compare.md, compare.json.",
    )
    compare_cmd.add_argument(
        "--cells",
        nargs="+",
        choices=CELLS,
        default=list(COMPARE_CELLS),
        help=f"cells to train, in this order (default: {' '.join(COMPARE_CELLS)})",
    )
    compare_cmd.add_argument(
        "--time-budget",
        dest="time_budget",
        default=argparse.SUPPRESS,
        help=f"wall-clock budget of each cell, evaluation included (default: {COMPARE_BUDGET}, "
        "or the --preset's)",
    )
    for section in dataclasses.fields(RunConfig):
        group = compare_cmd.add_argument_group(f"{section.name} settings, the same for every cell")
        _add_dataclass_flags(group, section.default_factory, lambda f: f.name not in _COMPARE_SKIPS)  # type: ignore[arg-type]
    compare_cmd.add_argument(
        "--config", metavar="FILE.toml", help="read settings from a TOML file (flags win)"
    )

    inspect_cmd = commands.add_parser(
        "inspect",
        help="find interpretable units: correlate activations with properties of a text",
        description="Run a model over a text, record every layer's hidden (and LSTM cell) "
        "activations, print the units most correlated with simple properties of the text, and "
        "write an HTML page and a PNG of the text coloured by those units.",
    )
    inspect_cmd.add_argument("checkpoint", help="checkpoint directory or run directory")
    inspect_cmd.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text to read")
    inspect_cmd.add_argument(
        "--max-chars",
        type=int,
        default=INSPECT_MAX_CHARS,
        help=f"read only the first N characters (default: {INSPECT_MAX_CHARS})",
    )
    inspect_cmd.add_argument(
        "--top", type=int, default=3, help="units to list and show per property (default: 3)"
    )
    inspect_cmd.add_argument(
        "--units", nargs="+", default=[], metavar="UNIT",
        help="also show these units, named like c2:17 (layer 2's cell state, unit 17) or h1:5",
    )  # fmt: skip
    inspect_cmd.add_argument(
        "--show", type=int, default=1000, help="characters shown in the HTML (default: 1000)"
    )
    inspect_cmd.add_argument(
        "--html", default="inspect.html", help="HTML page to write (default: inspect.html)"
    )
    inspect_cmd.add_argument(
        "--png", default="inspect.png", help="PNG picture to write (default: inspect.png)"
    )
    inspect_cmd.add_argument(
        "--unknown",
        choices=UNKNOWN_POLICIES,
        default="error",
        help="characters outside the model's vocabulary: error, skip or replace them",
    )
    _add_device_flag(inspect_cmd)
    return [plot_cmd, compare_cmd, inspect_cmd]


def _plot(args: argparse.Namespace) -> int:
    out = plot_runs(args.run_dirs, args.out, labels=args.labels, title=args.title)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _compare(args: argparse.Namespace) -> int:
    overrides = load_config_file(args.config) if args.config else {}
    overrides.update(_given(args, RunConfig))
    base = RunConfig().with_overrides(overrides)
    # compare's own default budget, unless a budget was asked for (a preset brings its own).
    given = "time_budget" in overrides or "preset" in overrides
    _check_memory("compare", base)
    from charlstm.comparison import compare

    result = compare(base, cells=args.cells, time_budget=None if given else COMPARE_BUDGET)
    if result.rows:  # under torchrun, rank 0 alone reports
        print(result.table())
        print(f"wrote {result.plot} and the table in {result.out}", file=sys.stderr)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    for flag, value in (("--max-chars", args.max_chars), ("--top", args.top),
                        ("--show", args.show)):  # fmt: skip
        if value < 1:
            raise CharLSTMError(f"{flag} must be at least 1, got {value}")
    from charlstm.data import read_text_file
    from charlstm.interpret import inspect

    text = read_text_file(args.text, max_chars=args.max_chars)
    result = inspect(
        args.checkpoint, text, max_chars=args.max_chars, unknown=args.unknown, device=args.device
    )
    html = result.write_html(args.html, k=args.top, units=args.units, show=args.show)
    png = result.write_png(args.png, units=args.units)
    print(result.report(args.top))
    print(f"wrote {html} and {png}", file=sys.stderr)
    return 0


# ---- export ---------------------------------------------------------------------------------


def _add_export_command(commands: Any) -> argparse.ArgumentParser:
    """The export subcommand: a checkpoint, the format and the file to write."""
    export_cmd = commands.add_parser(
        "export",
        help="write a model for other runtimes: an ONNX step model",
        description="Write a checkpoint as an ONNX step model (opset "
        f"{ONNX_OPSET}, float32): inputs ids (int64 [batch, time]) and the carried state (h, "
        "and c for an LSTM, each [layers, batch, hidden]); outputs logits ([batch, time, "
        "vocabulary]) and the next state (h_next, c_next); batch and time are dynamic. The "
        "vocabulary and the sampling defaults are in the model's metadata. Needs the export "
        "extra: pip install 'charlstm[export]'. See docs/export.md.",
    )
    export_cmd.add_argument("checkpoint", help="checkpoint directory or run directory")
    export_cmd.add_argument(
        "--format", choices=EXPORT_FORMATS, default="onnx", help="what to write (default: onnx)"
    )
    export_cmd.add_argument(
        "--out",
        default="model.onnx",
        help="file to write, in an existing directory; replaced whole (default: model.onnx)",
    )
    return export_cmd


def _export(args: argparse.Namespace) -> int:
    from charlstm.exporting import export

    out = export(args.checkpoint, args.out, format=args.format)
    print(f"wrote {out} (ONNX opset {ONNX_OPSET}, float32)", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _progress(what: str, unit: str) -> Iterator[Callable[[int], None]]:
    """A progress callback whose bar appears on stderr with the first progress, not before (an
    input error stays the only line): live on a terminal, a line every 10 s in a log."""
    from tqdm.auto import tqdm

    bars: list[Any] = []

    def update(count: int) -> None:
        if not bars:
            live = sys.stderr.isatty()
            bars.append(tqdm(desc=what, unit=unit, file=sys.stderr, dynamic_ncols=True,
                             mininterval=0.1 if live else 10.0))  # fmt: skip
        bars[0].update(count)

    try:
        yield update
    finally:
        for bar in bars:
            bar.close()


def _out_of_memory(error: BaseException) -> bool:
    """Whether an error is an allocation that failed: MemoryError (numpy, Python), or torch's
    OutOfMemoryError (a GPU) or its CPU allocator's RuntimeError."""
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")  # not imported: no torch error to recognise
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(error, oom):
        return True
    text = str(error).lower()
    return "can't allocate memory" in text or "out of memory" in text


def _smaller(args: argparse.Namespace) -> str:
    return _SMALLER.get(args.command, "use smaller settings")


def _check_memory(command: str, config: RunConfig) -> None:
    """Refuse at once a CPU model whose training cannot fit in this machine's memory, rather
    than allocating for minutes (or failing in the middle of building it)."""
    from charlstm.data import available_memory
    from charlstm.device import resolve_device

    try:
        config.model.validate()
        config.train.validate()
        config.session.validate()
    except CharLSTMError:
        return  # not a network yet: the command's own checks say what is wrong
    if resolve_device(config.session.device).type != "cpu":
        return  # a GPU's memory is its own: an error there is caught as it happens
    available = available_memory()
    if available is None:
        return
    mc, tc = config.model, config.train
    # A lower bound, so a refusal is never wrong: the fewest symbols a text has (2); the
    # weights, their gradients, one optimizer moment and the weight average (--ema), in fp32;
    # each layer's outputs, kept for the backward pass.
    parameters = mc.parameter_count(2)
    copies = 3 + (tc.ema > 0)
    needed = 4 * copies * parameters
    needed += 4 * tc.batch_size * tc.seq_len * mc.n_layers * mc.hidden_dim
    if needed > available:
        raise CharLSTMError(
            f"{command}: a {mc.n_layers} x {mc.hidden_dim:,} {mc.cell} of {parameters:,} or "
            f"more parameters, trained with --batch-size {tc.batch_size} and --seq-len "
            f"{tc.seq_len}, needs at least {_gigabytes(needed)} of memory and "
            f"{_gigabytes(available)} is available: {_SMALLER['train']}"
        )


def _gigabytes(size: int) -> str:
    gb = size / 1e9
    return f"{gb:,.1f} GB" if gb < 1e6 else f"{gb:.3g} GB"


class _Terminated(KeyboardInterrupt):
    """SIGTERM arrived: the command stops where it is, as Ctrl-C stops it."""


@contextlib.contextmanager
def _sigterm_stops_like_ctrl_c() -> Iterator[None]:
    """Within, SIGTERM raises _Terminated, so that the command unwinds (no half-written line,
    no temporary file left) and exits with 143 instead of dying of the signal."""

    def stop(signum: int, frame: object) -> None:
        raise _Terminated

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: signals are not ours to set
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _quiet_second_interrupt() -> None:
    """From here to the process's end (flushing, atexit handlers, joining threads), Ctrl-C
    ends it at once with status 130, without the traceback Python prints for an interrupted
    atexit handler."""

    def leave(signum: int, frame: object) -> None:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)

    with contextlib.suppress(ValueError):  # not the main thread: signals are not ours to set
        signal.signal(signal.SIGINT, leave)


def _say(line: str) -> None:
    if distributed.is_main_process():
        print(line, file=sys.stderr)


def _given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The flags of ``cls`` (or of RunConfig's sections) that were given on the command line."""
    classes = [f.default_factory for f in dataclasses.fields(cls)] if cls is RunConfig else [cls]
    names = {f.name for c in classes for f in dataclasses.fields(c)}  # type: ignore[arg-type]
    return {k: v for k, v in vars(args).items() if k in names}


def _add_dataclass_flags(
    parser: Any, cls: type, only: Callable[[dataclasses.Field], bool] = lambda f: True
) -> None:
    """A flag for each field of ``cls`` that ``only`` keeps, its help from the field's."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not only(f):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if callable(f.default_factory) else f.default
        kind = hints[f.name]
        options: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": f.name}
        help_text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, action="store_true", help=help_text, **options)
            continue
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # Optional[...]
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        if typing.get_origin(kind) is list:
            options["nargs"] = "+"
            options["metavar"] = f.name.upper()
        elif kind in (int, float):
            options["type"] = kind
        if f.metadata.get("choices"):
            options["choices"] = f.metadata["choices"]
        if default not in (None, []) and "default" not in help_text:
            shown = " ".join(default) if isinstance(default, list) else default
            help_text = f"{help_text} (default: {shown!s})".replace("\n", "\\n")
        parser.add_argument(flag, help=help_text, **options)


def _add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda", "mps"),
        default="auto",
        help="auto picks cuda, then mps, then cpu (default: auto)",
    )


def _version() -> str:
    from charlstm import __version__

    return f"charlstm {__version__}"
