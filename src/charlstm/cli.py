"""The ``charlstm`` command: train, sample and eval.

Flags are generated from the configuration dataclasses, so the CLI, config files and
checkpoints cannot drift apart. This is the only module that turns errors into exit codes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any, NoReturn

from charlstm.checkpoint import read_checkpoint
from charlstm.config import RunConfig, SampleConfig, load_config_file
from charlstm.errors import CharLSTMError, TrainingInterrupted
from charlstm.lm import CharLM
from charlstm.train import find_resume_checkpoint, train

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one ``error:`` line like every other error."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    """The full command-line parser, flags generated from the config dataclasses."""
    parser = _Parser(
        prog="charlstm",
        description="Character-level LSTM / GRU / RNN language models: train, sample, eval.",
    )
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train_cmd = commands.add_parser(
        "train",
        help="train a model (default: 5 minutes on the built-in Shakespeare corpus)",
        description="Train a model, then print a sample from its best checkpoint.",
    )
    for section in dataclasses.fields(RunConfig):
        group = train_cmd.add_argument_group(f"{section.name} settings")
        _add_dataclass_flags(group, section.default_factory)  # type: ignore[arg-type]
    train_cmd.add_argument(
        "--config", metavar="FILE.toml", help="read settings from a TOML file (flags win)"
    )

    sample_cmd = commands.add_parser(
        "sample", help="generate text from a checkpoint", description="Generate text."
    )
    sample_cmd.add_argument("checkpoint", help="checkpoint directory or run directory")
    _add_dataclass_flags(sample_cmd, SampleConfig)
    _add_device_flag(sample_cmd)

    eval_cmd = commands.add_parser(
        "eval",
        help="measure a checkpoint's loss on text",
        description="Print loss (nats/char), bits/char and perplexity over whole files.",
    )
    eval_cmd.add_argument("checkpoint", help="checkpoint directory or run directory")
    eval_cmd.add_argument("--data", nargs="+", required=True, help="files to evaluate on")
    eval_cmd.add_argument("--encoding", help="text encoding (default: the model's, UTF-8)")
    eval_cmd.add_argument(
        "--unknown",
        choices=("error", "skip", "replace"),
        default="error",
        help="characters outside the model's vocabulary: error, skip or replace them",
    )
    eval_cmd.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_device_flag(eval_cmd)

    for sub in (train_cmd, sample_cmd, eval_cmd):
        sub.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args = build_parser().parse_args(argv)
    sys.stdout.reconfigure(errors="replace")  # type: ignore[union-attr]
    try:
        code = {"train": _train, "sample": _sample, "eval": _eval}[args.command](args)
        sys.stdout.flush()  # a closed pipe must show up here, not in Python's flush at exit
        return code
    except CharLSTMError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingInterrupted as e:
        print(f"{e}; continue with: charlstm train --resume {e.run_dir}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `charlstm sample ... | head`
        # Python flushes stdout again at exit; point it at /dev/null so that cannot fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _train(args: argparse.Namespace) -> int:
    overrides = load_config_file(args.config) if args.config else {}
    overrides.update(_given(args, RunConfig))
    base = RunConfig().with_overrides(overrides)
    resume_from = find_resume_checkpoint(base.train)
    if resume_from is not None:
        # A resumed run keeps its saved settings; only the flags given now change them.
        base = read_checkpoint(resume_from).config.with_overrides(overrides)
    result = train(base, progress=True)
    length = base.train.sample_length
    if length:
        print(f"sample from {result.run_dir / 'best'}:", file=sys.stderr)
        # From a newline, or its stand-in when the training text had none (a one-line file).
        _write_stream(result.model.stream("\n", length, unknown="replace"))
    return 0


def _sample(args: argparse.Namespace) -> int:
    settings = SampleConfig(**_given(args, SampleConfig))
    settings.validate()
    model = CharLM.load(args.checkpoint, device=args.device)
    options = {
        "temperature": settings.temperature,
        "top_k": settings.top_k,
        "top_p": settings.top_p,
        "seed": settings.seed,
        "unknown": settings.unknown,
    }
    if settings.num_samples == 1:
        _write_stream(model.stream(settings.prompt, settings.length, **options))
        return 0
    samples = model.generate_batch(
        settings.num_samples, settings.prompt, settings.length, **options
    )
    for index, text in enumerate(samples, 1):
        sys.stdout.write(f"=== sample {index} ===\n{text}\n")
    return 0


def _eval(args: argparse.Namespace) -> int:
    model = CharLM.load(args.checkpoint, device=args.device)
    result = model.evaluate_files(args.data, encoding=args.encoding, unknown=args.unknown)
    if result.characters == 0:
        raise CharLSTMError("the evaluation text has fewer than two characters: nothing to score")
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(
            f"loss {result.loss:.4f} nats/char  {result.bpc:.4f} bits/char  "
            f"perplexity {result.perplexity:.3f}  over {result.characters:,} characters"
        )
    return 0


def _write_stream(pieces: typing.Iterable[str]) -> None:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The flags of ``cls`` (or of RunConfig's sections) that were given on the command line."""
    classes = [f.default_factory for f in dataclasses.fields(cls)] if cls is RunConfig else [cls]
    names = {f.name for c in classes for f in dataclasses.fields(c)}  # type: ignore[arg-type]
    return {k: v for k, v in vars(args).items() if k in names}


def _add_dataclass_flags(parser: Any, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
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
