"""The continuous-batching engine: every request's text is the one it gets alone.

The model is the session's tiny trained run; each request's text is compared with
``CharLM.generate`` (and for a few, the ``charlstm sample`` command) run alone with the same
prompt, seed and settings. Every wait is bounded: readers time out rather than hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

import charlstm
from charlstm.config import RunConfig
from charlstm.data import Vocab
from charlstm.engine import Engine, EngineClosed, EngineFull, Request, Sequence
from charlstm.errors import CharLSTMError
from charlstm.lm import CharLM
from charlstm.model import CharRNN

WAIT = 60.0  # seconds any one reader waits for text before the test fails
PROMPTS = ("ROMEO:", "\n", "First Citizen:\nWe are", "a", "KING HENRY", "To be, or not to be")
# (temperature, top_k, top_p): sampled plain, top-k, top-p, both, greedy, and top-k 1.
SETTINGS = ((0.8, 0, 1.0), (1.0, 5, 1.0), (1.2, 0, 0.9), (0.7, 10, 0.8), (0.0, 0, 1.0),
            (1.0, 1, 1.0), (0.5, 0, 0.5), (1.5, 3, 0.95))  # fmt: skip


@pytest.fixture(scope="module")
def model(trained_run: Path) -> CharLM:
    return charlstm.load(trained_run, device="cpu")


def request(model: CharLM, prompt: str, max_tokens: int, **settings) -> Request:
    return Request(model.vocab.encode(prompt), max_tokens, **settings)


def alone(model: CharLM, r: Request) -> str:
    """What ``generate`` gives for ``r`` on its own (its first sample; see alone_sample)."""
    prompt = model.vocab.decode(r.prompt_ids.tolist())
    return model.generate(
        prompt, r.max_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, seed=r.seed
    )


def varied_requests(model: CharLM, count: int) -> list[Request]:
    """``count`` requests that differ in prompt, seed, settings and length."""
    requests = []
    for i in range(count):
        temperature, top_k, top_p = SETTINGS[i % len(SETTINGS)]
        prompt = PROMPTS[(i * 5) % len(PROMPTS)]
        seed = None if temperature == 0 else 1000 + 17 * i
        length = 5 + (i * 37) % 140
        requests.append(
            request(model, prompt, length, temperature=temperature, top_k=top_k, top_p=top_p,
                    seed=seed)
        )  # fmt: skip
    return requests


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, str]:
    """What a stream of ``text`` shows with these stop strings, and its finish reason: it ends
    at the first character that completes one, just before that one begins."""
    for end in range(1, len(text) + 1):
        found = [text[:end].find(s) for s in stops if s in text[:end]]
        if found:
            return text[: min(found)], "stop"
    return text, "length"


def cli_sample(run: Path, data_dir: Path, cwd: Path, model: CharLM, r: Request, *flags) -> str:
    """What ``charlstm sample --no-echo`` prints for ``r``."""
    result = run_cli(
        ["sample", run, "--device", "cpu", "--prompt", model.vocab.decode(r.prompt_ids.tolist()),
         "--length", r.max_tokens, "--seed", r.seed, "--temperature", r.temperature,
         "--top-k", r.top_k, "--top-p", r.top_p, "--no-echo", *flags],
        data_dir, cwd,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


# ---- the same text as alone -------------------------------------------------------------------


def test_64_concurrent_requests_each_give_their_text_alone(model):
    requests = varied_requests(model, 64)
    engine = Engine(model, max_sequences=64)
    sequences = [engine.submit(r) for r in requests]
    engine.start()  # all 64 join at the first step and leave one by one as their lengths end
    try:
        texts = [s.text(timeout=WAIT) for s in sequences]
    finally:
        engine.close()
    assert [s.finish_reason for s in sequences] == ["length"] * 64
    assert [s.tokens for s in sequences] == [r.max_tokens for r in requests]
    assert texts == [alone(model, r) for r in requests]
    assert len(set(texts)) > 50  # they really are different requests


def test_requests_that_join_mid_run_and_leave_give_their_text_alone(model):
    requests = varied_requests(model, 40)
    with Engine(model, max_sequences=16, max_waiting=40) as engine:
        first = [engine.submit(r) for r in requests[:10]]
        reader = first[0].pieces(timeout=WAIT)
        texts = {0: next(reader)}  # the batch is under way
        later = [engine.submit(r) for r in requests[10:]]  # some wait for a place
        texts[0] += "".join(reader)
        sequences = first + later
        texts.update({i: s.text(timeout=WAIT) for i, s in enumerate(sequences) if i})
        assert [texts[i] for i in range(40)] == [alone(model, r) for r in requests]
    assert engine.running == 0


@pytest.mark.slow
def test_the_command_prints_what_the_engine_gives(model, trained_run, isolated_data_dir, tmp_path):
    picked = [
        request(model, "ROMEO:", 80, temperature=0.9, top_k=8, top_p=0.95, seed=11),
        request(model, "To be", 60, temperature=1.1, top_k=0, top_p=1.0, seed=12),
    ]
    others = varied_requests(model, 30)
    with Engine(model) as engine:
        sequences = [engine.submit(r) for r in [*others[:15], *picked, *others[15:]]]
        texts = [s.text(timeout=WAIT) for s in sequences[15:17]]
        for s in sequences:
            s.text(timeout=WAIT)
    for r, text in zip(picked, texts, strict=True):
        assert cli_sample(trained_run, isolated_data_dir, tmp_path, model, r) == text + "\n"


@pytest.mark.slow
def test_sample_i_of_n_is_the_commands_sample_i(model, trained_run, isolated_data_dir, tmp_path):
    base = request(model, "KING", 40, temperature=1.0, top_k=0, top_p=0.9, seed=5)
    samples = [dataclasses.replace(base, index=i) for i in range(4)]
    with Engine(model) as engine:
        sequences = [engine.submit(r) for r in [*varied_requests(model, 7), *samples]]
        texts = [s.text(timeout=WAIT) for s in sequences][7:]
    printed = cli_sample(trained_run, isolated_data_dir, tmp_path, model, base, "--num-samples", 4)
    assert printed == "".join(f"=== sample {i} ===\n{t}\n" for i, t in enumerate(texts, 1))
    prompt = "KING"
    batch = model.generate_batch(4, prompt, 40, temperature=1.0, top_p=0.9, seed=5)
    assert batch == texts
    assert model.generate_batch(2, prompt, 40, temperature=1.0, top_p=0.9, seed=5) == texts[:2]
    assert texts[0] == alone(model, base)
    assert len(set(texts)) == 4


def test_greedy_requests_give_the_greedy_text_whatever_runs_beside(model):
    greedy = [request(model, p, 70, temperature=0.0) for p in PROMPTS]
    with Engine(model) as engine:
        sequences = [engine.submit(r) for r in varied_requests(model, 20) + greedy]
        texts = [s.text(timeout=WAIT) for s in sequences][20:]
    assert texts == [model.generate(p, 70, temperature=0) for p in PROMPTS]
    assert texts == [model.generate(p, 70, top_k=1, seed=9) for p in PROMPTS]


def test_no_seed_draws_fresh_text(model):
    with Engine(model) as engine:
        a, b = (engine.submit(request(model, "ROMEO:", 60, temperature=1.0)) for _ in range(2))
        assert a.text(timeout=WAIT) != b.text(timeout=WAIT)


def test_asyncio_readers_get_the_same_text(model):
    requests = varied_requests(model, 12)

    async def read(sequence: Sequence) -> str:
        return "".join([piece async for piece in sequence.apieces()])

    async def main(engine: Engine) -> list[str]:
        sequences = [engine.submit(r) for r in requests]
        return await asyncio.wait_for(asyncio.gather(*map(read, sequences)), WAIT)

    with Engine(model) as engine:
        texts = asyncio.run(main(engine))
    assert texts == [alone(model, r) for r in requests]


def byte_model() -> CharLM:
    text = "h\u00e9llo w\u00f6rld \u20ac \U0001d11e\n"
    config = RunConfig().with_overrides(
        {"cell": "gru", "embed_dim": 8, "hidden_dim": 16, "n_layers": 1, "dropout": 0.0}
    )
    vocab = Vocab("bytes", tuple(sorted(set(text.encode()))))
    torch.manual_seed(3)
    return CharLM(CharRNN(config.model, vocab.size).eval(), vocab, config)


def test_a_byte_model_gives_whole_characters_as_alone():
    model = byte_model()
    requests = [request(model, "h\u00e9", 50 + i, temperature=1.5, seed=i) for i in range(6)]
    with Engine(model) as engine:
        texts = [s.text(timeout=WAIT) for s in map(engine.submit, requests)]
    assert texts == [alone(model, r) for r in requests]
    assert any(ord(c) > 127 for c in "".join(texts))


# ---- stop strings -----------------------------------------------------------------------------


def run_with_stops(model: CharLM, r: Request) -> tuple[list[str], str | None]:
    with Engine(model) as engine:
        others = [engine.submit(o) for o in varied_requests(model, 5)]
        sequence = engine.submit(r)
        pieces = list(sequence.pieces(timeout=WAIT))
        for o in others:
            o.text(timeout=WAIT)
    return pieces, sequence.finish_reason


def test_a_stop_string_ends_the_text_just_before_it(model):
    full = model.generate("ROMEO:", 300, temperature=1.0, seed=21)
    stop = full[120:123]
    r = request(model, "ROMEO:", 300, temperature=1.0, seed=21, stop=(stop,))
    pieces, reason = run_with_stops(model, r)
    assert "".join(pieces) == full[: full.find(stop)]
    assert reason == "stop"
    # Streamed: what was shown never held the stop string, not even across pieces.
    assert all(stop not in "".join(pieces[:n]) for n in range(len(pieces) + 1))


def test_the_first_stop_string_to_complete_wins(model):
    full = model.generate("\n", 300, temperature=1.0, seed=22)
    stops = (full[200:202], full[90:95], "\x00never")
    expected, reason = cut_at_stop(full, stops)
    r = request(model, "\n", 300, temperature=1.0, seed=22, stop=stops)
    pieces, got_reason = run_with_stops(model, r)
    assert ("".join(pieces), got_reason) == (expected, reason)
    assert reason == "stop" and len(expected) <= 90


def test_text_that_only_begins_a_stop_string_is_shown_once_known(model):
    full = model.generate("KING", 150, temperature=1.0, seed=23)
    # Both begin like the text (at 40 and at its very end) and then go where it does not.
    stops = (full[40:43] + "\x00", full[-2:] + "\x00")
    r = request(model, "KING", 150, temperature=1.0, seed=23, stop=stops)
    pieces, reason = run_with_stops(model, r)
    assert ("".join(pieces), reason) == (full, "length")


def test_a_stop_string_on_a_byte_model_matches_whole_characters():
    model = byte_model()
    full = model.generate("h", 200, temperature=1.5, seed=4)
    stop = next(c for c in full if 127 < ord(c) != 0xFFFD)  # a multi-byte character
    r = request(model, "h", 200, temperature=1.5, seed=4, stop=(stop,))
    with Engine(model) as engine:
        sequence = engine.submit(r)
        text = sequence.text(timeout=WAIT)
    assert (text, sequence.finish_reason) == (full[: full.find(stop)], "stop")


# ---- cancelling, a full engine, closing ---------------------------------------------------------


def endless(model: CharLM, **settings) -> Request:
    return request(model, "ROMEO:", 10**9, temperature=1.0, seed=1, **settings)


def test_cancel_ends_the_sequence_and_frees_its_place(model):
    with Engine(model, max_sequences=1, max_waiting=0) as engine:
        sequence = engine.submit(endless(model))
        reader = sequence.pieces(timeout=WAIT)
        shown = next(reader)
        with pytest.raises(EngineFull):
            engine.submit(endless(model))
        sequence.cancel()
        shown += "".join(reader)
        assert sequence.finish_reason == "abort"
        assert engine.running == 0
        assert len(shown) == sequence.tokens < 10**9
        assert shown == model.generate("ROMEO:", len(shown), temperature=1.0, seed=1)
        again = engine.submit(request(model, "a", 5, temperature=0))
        assert again.text(timeout=WAIT) == model.generate("a", 5, temperature=0)


def test_a_cancelled_waiting_request_never_runs(model):
    with Engine(model, max_sequences=1, max_waiting=1) as engine:
        running = engine.submit(endless(model))
        reader = running.pieces(timeout=WAIT)
        next(reader)  # running holds the one place
        waiting = engine.submit(request(model, "a", 5, temperature=0))
        waiting.cancel()
        assert waiting.text(timeout=WAIT) == ""
        assert (waiting.finish_reason, waiting.tokens) == ("abort", 0)
        assert running.finish_reason is None
        reader.close()  # leaving the reading cancels
        assert "".join(running.pieces(timeout=WAIT)) is not None
        assert running.finish_reason == "abort"


def test_leaving_the_reading_early_cancels(model):
    with Engine(model) as engine:
        sequence = engine.submit(endless(model))
        for _ in sequence.pieces(timeout=WAIT):
            break
        assert sequence.text(timeout=WAIT) is not None  # what was left, then the end
        assert sequence.finish_reason == "abort"

        async def first_piece() -> None:
            async for _ in sequence_b.apieces():
                break

        sequence_b = engine.submit(endless(model))
        asyncio.run(first_piece())
        sequence_b.text(timeout=WAIT)
        assert sequence_b.finish_reason == "abort"


def test_a_reader_whose_event_loop_closed_does_not_stop_the_engine(model):
    engine = Engine(model)  # not started: the reader waits, and gives up
    gone = engine.submit(request(model, "a", 5, temperature=0))

    async def give_up() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(anext(gone.apieces()), 0.01)

    asyncio.run(give_up())  # its loop is closed now, its wake-up still registered
    engine.start()
    try:
        again = engine.submit(request(model, "a", 5, temperature=0))
        assert again.text(timeout=WAIT) == model.generate("a", 5, temperature=0)
    finally:
        engine.close()
    assert gone.finish_reason == "abort"


def test_a_full_engine_refuses_until_a_place_frees(model):
    engine = Engine(model, max_sequences=2, max_waiting=1)
    held = [engine.submit(request(model, "a", 20, temperature=0)) for _ in range(3)]
    with pytest.raises(EngineFull, match="full") as refused:
        engine.submit(request(model, "a", 20, temperature=0))
    assert isinstance(refused.value, CharLSTMError)  # the server answers it with 429
    engine.start()
    try:
        for sequence in held:
            sequence.text(timeout=WAIT)
        assert engine.submit(request(model, "a", 3, temperature=0)).text(timeout=WAIT)
    finally:
        engine.close()


def test_close_without_draining_aborts_what_runs(model):
    engine = Engine(model, max_sequences=3, max_waiting=5)
    engine.start()
    running = [engine.submit(endless(model)) for _ in range(3)]
    readers = [sequence.pieces(timeout=WAIT) for sequence in running]
    for reader in readers:
        next(reader)
    waiting = [engine.submit(endless(model)) for _ in range(2)]
    engine.close(drain=False)
    assert [s.finish_reason for s in running + waiting] == ["abort"] * 5
    assert all(isinstance("".join(reader), str) for reader in readers)  # each ends
    assert [s.tokens for s in waiting] == [0, 0]
    with pytest.raises(EngineClosed):
        engine.submit(request(model, "a", 3))


def test_close_with_draining_lets_every_sequence_finish(model):
    requests = varied_requests(model, 10)
    engine = Engine(model, max_sequences=4, max_waiting=10)
    engine.start()
    sequences = [engine.submit(r) for r in requests]
    engine.close(drain=True)
    assert [s.finish_reason for s in sequences] == ["length"] * 10
    assert [s.text(timeout=WAIT) for s in sequences] == [alone(model, r) for r in requests]


class BrokenStepper:
    """A stepper whose steps fail: as running out of memory mid-batch would."""

    def load(self, rows: slice, state: tuple[torch.Tensor, ...]) -> None:
        pass

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        raise MemoryError("no memory for the step")


def test_an_engine_failure_reaches_every_reader(model):
    engine = Engine(model)
    engine._step = BrokenStepper()  # type: ignore[assignment]
    sequence = engine.submit(request(model, "a", 50, temperature=1.0, seed=0))
    engine.start()
    with pytest.raises(RuntimeError, match="stopped on an error") as failed:
        sequence.text(timeout=WAIT)
    assert isinstance(failed.value.__cause__, MemoryError)
    assert sequence.finish_reason == "abort"
    with pytest.raises(EngineClosed):
        engine.submit(request(model, "a", 3))
    engine.close()


def test_a_silent_sequence_times_out_its_reader(model):
    engine = Engine(model)  # never started: nothing comes
    sequence = engine.submit(request(model, "a", 3))
    with pytest.raises(TimeoutError):
        next(sequence.pieces(timeout=0.01))
    assert sequence._cancelled  # the reader left: nobody wants the text any more
    engine.close()
    assert sequence.finish_reason == "abort"


# ---- requests that are refused ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"temperature": -1.0}, "temperature must be 0"),
        ({"temperature": float("nan")}, "temperature must be 0"),
        ({"top_k": -1}, "top_k must be 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"seed": -1}, r"seed must be in \[0, 2\*\*63\)"),
        ({"seed": 2**63}, r"seed must be in \[0, 2\*\*63\)"),
        ({"stop": ("",)}, "stop strings must be non-empty"),
        ({"index": -1}, "index must not be negative"),
        ({"prompt_ids": np.array([], dtype=np.int64)}, "non-empty 1-D array of integer"),
        ({"prompt_ids": np.array([[1, 2]])}, "non-empty 1-D array of integer"),
        ({"prompt_ids": np.array([1.0])}, "non-empty 1-D array of integer"),
    ],
)
def test_settings_out_of_range_are_refused(settings, message):
    fields = {"prompt_ids": np.array([1, 2]), "max_tokens": 5, **settings}
    with pytest.raises(CharLSTMError, match=message):
        Request(**fields)


def test_ids_outside_the_vocabulary_are_refused(model):
    engine = Engine(model)
    for ids in ([0, model.vocab.size], [-1]):
        with pytest.raises(CharLSTMError, match=r"prompt_ids must be in \[0, \d+\)"):
            engine.submit(Request(np.array(ids), 5))


def test_a_request_keeps_its_own_copy_of_the_prompt():
    ids = np.array([1, 2, 3], dtype=np.uint8)
    r = Request(ids, 5)
    ids[0] = 9
    assert r.prompt_ids.tolist() == [1, 2, 3] and r.prompt_ids.dtype == np.int64
    assert not r.prompt_ids.flags.writeable
