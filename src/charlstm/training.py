"""``train(config)``: a run from its configuration to its best checkpoint.

It settles the run directory (locked against a second writer), reads the corpus, picks the
preset for this machine when asked to (``preset = "auto"``), builds the network and its
:class:`~charlstm.trainer.Trainer`, resumes from ``last/`` when told to, and hands the loop to
a :class:`~charlstm.session.TrainingSession`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from charlstm import distributed
from charlstm.budget import format_seconds
from charlstm.checkpoint import (
    INIT_FROM_KEY,
    Checkpoint,
    origin_info,
    read_checkpoint,
    recover_checkpoint,
)
from charlstm.config import DEFAULT_TIME_BUDGET, RunConfig
from charlstm.data import Corpus, Vocab, load_corpus, resume_stdin
from charlstm.device import keep_freed_memory, resolve_device, synchronize
from charlstm.distributed import World
from charlstm.errors import CharLSTMError
from charlstm.evaluation import EvalResult
from charlstm.finetune import adopt_model, describe_origin, read_source
from charlstm.lm import CharLM
from charlstm.model import CharRNN, with_more_ids
from charlstm.presets import AUTO, PRESETS, apply_preset, choose_preset
from charlstm.run_dir import (
    check_new_run_dir,
    check_resume_compatible,
    find_resume_checkpoint,
    first_missing,
    prepare_run_dir,
    run_directory,
    wrote_anything,
)
from charlstm.runlock import run_lock
from charlstm.session import TrainingSession
from charlstm.trainer import Trainer


@dataclass
class TrainResult:
    """What a finished run returns."""

    run_dir: Path
    steps: int
    elapsed: float  # seconds, over all sessions of the run
    best_val: EvalResult | None  # None on torchrun ranks other than 0
    model: CharLM | None = field(repr=False)  # the best checkpoint; None on ranks other than 0
    # Why this result is weak, if it is: e.g. a budget that ran out after a handful of steps.
    warnings: list[str] = field(default_factory=list)
    config: RunConfig | None = field(default=None, repr=False)  # as trained: presets applied


def train(config: RunConfig, *, progress: bool = True, quiet: bool = False) -> TrainResult:
    """Train a model as ``config`` says; returns the best checkpoint loaded as a CharLM.

    ``train.preset = "auto"`` picks the preset for this machine and corpus: once the corpus
    is read, the run measures how fast this machine trains the default model (counted in the
    budget) and applies :func:`~charlstm.presets.choose_preset`'s settings to those left at
    their defaults. A resumed run keeps its saved settings.

    With a time budget, the run first measures how fast it trains and scores, refuses a
    budget too small to train :data:`~charlstm.budget.MIN_STEPS` steps
    (:class:`~charlstm.budget.BudgetTooSmall`), and keeps evaluation to a small, measured
    share of the budget (:mod:`charlstm.budget`).

    ``progress`` shows a progress bar; ``quiet`` prints only warnings and the closing line.
    SIGINT (Ctrl-C) and SIGTERM let the current step finish, save ``last/`` and raise
    :class:`~charlstm.errors.TrainingInterrupted`; a second Ctrl-C stops at once.

    Under torchrun every process calls this and together they train one model with
    DistributedDataParallel (see :mod:`charlstm.distributed`); only rank 0 prints, logs and
    writes checkpoints, and only its result holds the model and the best validation loss.
    """
    started = time.monotonic()
    config.validate()
    world = distributed.world()  # a single process unless started by torchrun
    with world.failures():
        world.check_batch(config.train.batch_size)
        # Decided once, by rank 0: the default name holds the time.
        run_dir = Path(world.from_main(lambda: str(run_directory(config))))
        made = first_missing(run_dir) if world.is_main else None  # what this run creates
        with contextlib.ExitStack() as lock:
            world.on_main(lock.enter_context, run_lock(run_dir))  # one writer per directory
            try:
                return _train_locked(config, run_dir, world, started, progress, quiet)
            except BaseException:
                if made is not None and not wrote_anything(run_dir):  # a failed start: no trace
                    shutil.rmtree(made, ignore_errors=True)
                raise


def _train_locked(
    config: RunConfig, run_dir: Path, world: World, started: float, progress: bool, quiet: bool
) -> TrainResult:
    if config.session.resume:  # the lock holder alone may put back what a crash set aside
        world.on_main(recover_checkpoint, run_dir / "last")
    resume_from = find_resume_checkpoint(config.session)
    if resume_from is None:
        world.on_main(check_new_run_dir, config, run_dir)
    saved = read_checkpoint(resume_from) if resume_from else None
    source: Checkpoint | None = None  # what a fresh fine-tuning run starts from
    origin = saved.info.get(INIT_FROM_KEY) if saved else None
    if config.train.init_from:
        if saved is None:
            source = read_source(config, run_dir)
            origin = origin_info(source)
        # Resumed, the run's own model: the shape it took from its source.
        config = adopt_model(config, saved or source)
    if saved is not None:
        changed = check_resume_compatible(saved.config, config)
        if changed and world.is_main and not quiet:
            print(f"resuming with changed settings: {', '.join(changed)}", file=sys.stderr)
    device = world.place(resolve_device(config.session.device))
    if device.type == "cpu":
        keep_freed_memory()
    corpus = _read_corpus(config, saved, run_dir, world, source.vocab if source else None)
    config, train_speed = _settle_preset(config, corpus, world, saved is None, say=not quiet)
    torch.manual_seed(config.train.seed)
    net = CharRNN(config.model, corpus.vocab.size).to(device)
    if source is not None:
        net.load_state_dict(with_more_ids(source.weights, corpus.vocab.size))
    if world.rank:  # the same initial weights everywhere, but each process its own dropout
        torch.manual_seed(distributed.rank_seed(config.train.seed, world.rank))
    trainer = Trainer(config, corpus, net, device, world)
    session = TrainingSession(
        trainer, corpus, run_dir, started, progress=progress, quiet=quiet, origin=origin
    )
    try:
        # May refuse the budget: before any file is touched.
        session.validation.plan_evaluation(train_speed, _chars_per_step(config), session.elapsed())
        if resume_from is None:
            # Only now, with every input checked, may an --overwrite'd old run be removed.
            world.on_main(prepare_run_dir, run_dir)
        else:
            assert saved is not None
            session.restore(resume_from, saved.weights)
        if not quiet and world.is_main:
            print(_announcement(session, corpus), file=sys.stderr)
        with _stop_signals(session):
            session.run()
    finally:
        trainer.shards.close()
    return _result(session, config, device, quiet)


def _read_corpus(
    config: RunConfig, saved: Checkpoint | None, run_dir: Path, world: World, start: Vocab | None
) -> Corpus:
    """The run's corpus (a resumed run's own vocabulary and text, a fine-tuning run's text in
    the vocabulary ``start`` of its source), with a validation split."""
    vocab = saved.vocab if saved else start
    stdin = None  # a run trained on standard input reads its kept copy when none is piped in
    fingerprint = saved.info.get("corpus", {}).get("fingerprint") if saved else None
    if saved is not None:
        stdin = resume_stdin(config.data, fingerprint)
    # One process per machine first: a built-in corpus may be downloaded and cached.
    corpus = world.local_main_first(load_corpus, config.data, vocab=vocab, stdin=stdin)
    if len(corpus.val) < 2:  # nothing to score: refused before the run writes anything
        data = config.data
        where = ", ".join(data.val_data) or f"the last {data.val_fraction:g} of --data"
        raise CharLSTMError(
            f"the validation text ({where}) has {len(corpus.val)} characters: give it some text "
            "to score the model on"
        )
    if saved is not None and fingerprint != corpus.fingerprint:
        raise CharLSTMError(
            f"the training text differs from the one {run_dir} was trained on; resume with the "
            "same --data, or start a new run"
        )
    return corpus


def _settle_preset(
    config: RunConfig, corpus: Corpus, world: World, fresh: bool, say: bool
) -> tuple[RunConfig, float | None]:
    """The configuration to train (for a fresh run, ``preset = "auto"`` resolved for this
    machine and corpus) and, for a fresh budgeted run, the measured training speed (characters
    per second) that the budget is checked against."""
    budget = config.session.budget_seconds()
    if config.train.preset != AUTO or not fresh:
        measured = budget and fresh and world.size == 1
        return config, measure_speed(config, corpus.vocab.size) if measured else None
    # The budget that picks the preset is written down, so that no preset's own budget fills it.
    session = config.session
    if budget is not None and session.time_budget is None:
        session = dataclasses.replace(session, time_budget=DEFAULT_TIME_BUDGET)
    train = dataclasses.replace(config.train, preset=None)
    defaults = dataclasses.replace(config, train=train, session=session)
    if world.size > 1 or budget is None:  # processes must agree: the default settings
        return _named(defaults, "5m"), None
    speed = measure_speed(defaults, corpus.vocab.size)
    choice = choose_preset(budget, speed, len(corpus.train), defaults)
    picked = _named(apply_preset(defaults, choice.settings), choice.name).validate()
    if not _trains_alike(picked, defaults):
        # How often it evaluates is counted in steps of the settings picked: at their speed.
        picked_speed = measure_speed(picked, corpus.vocab.size)
        choice = choose_preset(budget, speed, len(corpus.train), defaults, picked_speed)
        picked = _named(apply_preset(defaults, choice.settings), choice.name).validate()
        speed = picked_speed
    if say and world.is_main:
        print(
            f"preset {choice.name}: {choice.reason} (--preset chooses one yourself)",
            file=sys.stderr,
        )
    return picked, speed


def _named(config: RunConfig, preset: str) -> RunConfig:
    """``config`` recording that ``preset`` brought its settings."""
    assert preset in PRESETS
    config = dataclasses.replace(config)
    config.train = dataclasses.replace(config.train)
    config.train.preset = preset  # set after building: the settings are already applied
    return config


def measure_speed(config: RunConfig, vocab_size: int = 96, steps: int = 2) -> float:
    """Characters per second at which this machine trains ``config``'s model: ``steps`` real
    training steps (after one to warm up) on random text of ``vocab_size`` symbols, on the
    device and in the arithmetic the run would use. Nothing is written, and a run trained
    afterwards is not affected."""
    config.validate()
    device = resolve_device(config.session.device)
    if device.type == "cpu":
        keep_freed_memory()
    vocab = Vocab("text", tuple(range(32, 32 + vocab_size)))
    length = (steps + 2) * config.train.batch_size * (config.train.seq_len + 1)
    text = np.random.default_rng(0).integers(0, vocab.size, length).astype(vocab.dtype)
    corpus = Corpus("random text", vocab, text, text[:0], fingerprint="")
    trainer = Trainer(config, corpus, CharRNN(config.model, vocab.size).to(device), device)
    try:
        trainer.step(config.train.lr)  # pays the one-off costs: kernel set-up, first allocations
        synchronize(device)
        began = time.perf_counter()
        for _ in range(steps):
            trainer.step(config.train.lr)
        synchronize(device)
        elapsed = time.perf_counter() - began
    finally:
        trainer.shards.close()
    return steps * _chars_per_step(config) / elapsed


def _chars_per_step(config: RunConfig) -> int:
    return config.train.batch_size * config.train.seq_len


def _trains_alike(a: RunConfig, b: RunConfig) -> bool:
    """Whether two configurations train at the same speed: same network, batch and arithmetic."""
    same = ("batch_size", "seq_len", "precision", "optimizer")
    return a.model == b.model and all(getattr(a.train, k) == getattr(b.train, k) for k in same)


@contextlib.contextmanager
def _stop_signals(session: TrainingSession) -> Iterator[None]:
    """Turn SIGINT / SIGTERM into a request to stop after the current step."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def request_stop(signum: int, frame: Any) -> None:
        if session.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        session.stop_signal = signum

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _announcement(session: TrainingSession, corpus: Corpus) -> str:
    """What a run says before its first step: corpus, model, arithmetic, limits, directory."""
    trainer, sc = session.trainer, session.sc
    mc, tc = trainer.config.model, trainer.tc
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[trainer.autocast]
    limits = [f"{sc.max_steps} steps"] if sc.max_steps else []
    limits += [f"{sc.max_epochs:g} epochs"] if sc.max_epochs else []
    limits += [format_seconds(session.budget)] if session.budget else []
    lines = [
        f"corpus {corpus.name}: {len(corpus.train):,} training and {len(corpus.val):,} "
        f"validation characters, vocabulary of {corpus.vocab.size}",
        f"model: {mc.cell} {mc.n_layers}x{mc.hidden_dim}, embedding {mc.embed_dim}, "
        f"{trainer.net.num_parameters():,} parameters",
        f"training on {trainer.device} in {precision}, batch {tc.batch_size} x {tc.seq_len} "
        f"({tc.batching}), stopping at {' or '.join(limits)}",
        *([describe_origin(session.origin, corpus.vocab.size)] if session.origin else []),
        f"run directory: {session.run_dir}",
        f"set-up: {session.elapsed() - session.elapsed_before:.1f}s (reading the corpus"
        + (", measuring speeds)" if session.validation.plan else ")"),
    ]
    plan = session.validation.plan
    if plan is not None and not plan.final_is_whole:
        whole = format_seconds(plan.score_seconds(len(corpus.val)))
        lines.append(
            f"the closing evaluation scores {session.validation.scored_words(plan.final_chars)}: "
            f"all of them would take {whole} (charlstm eval scores them all)"
        )
    world = trainer.world
    if world.size > 1:
        per = tc.batch_size // world.size
        lines.insert(
            3, f"distributed: {world.size} processes ({trainer.device.type}), {per} streams each"
        )
    return "\n".join(lines)


def _result(
    session: TrainingSession, config: RunConfig, device: torch.device, quiet: bool
) -> TrainResult:
    """The finished run: its best checkpoint loaded, and the closing line printed."""
    run_dir, steps, total = session.run_dir, session.trainer.step_count, session.elapsed()
    if not session.world.is_main:
        return TrainResult(run_dir, steps, total, None, None, session.warnings, config)
    best = read_checkpoint(run_dir / "best").info["val"]
    print(
        f"done: {steps} steps in {format_seconds(total)}; best validation loss "
        f"{best['loss']:.4f} nats/char ({best['bpc']:.4f} bpc) over "
        f"{session.validation.scored_words(best['characters'] + 1)} -> {run_dir}",
        file=sys.stderr,
    )
    # By type ("cuda", not "cuda:0"): under torchrun, set_device made it this process's GPU.
    model = CharLM.load(run_dir / "best", device=device.type)
    val = EvalResult(best["loss"], best["characters"])
    return TrainResult(run_dir, steps, total, val, model, session.warnings, config)
