"""The continuous-batching sampling engine behind ``charlstm serve``.

Many requests share one sampling loop on a background thread. A request joins the batch at the
next step (its prompt read on its own, batch 1), draws one character per step beside the others,
each with its own settings and generator, and leaves when it has its ``max_tokens`` characters,
when its text reaches a stop string, or at the step after :meth:`Sequence.cancel`.

**A request's text is the one ``charlstm sample`` gives alone** with the same prompt, seed and
settings, however many other requests run beside it and whenever they come and go: the engine
calls exactly what :func:`charlstm.sample.generate_ids` calls, in the same order per row (read
the prompt, then draw, step, draw, ...), and nothing a row computes depends on the other rows.
The module docstring of :mod:`charlstm.sample` says why: every sequence draws from its own
generator (:func:`~charlstm.sample.sample_rng` of its seed and index), the recurrence runs in
blocks of a fixed number of rows, so BLAS does the same arithmetic for a row at any place in
any batch, and the filter works row by row. Rows that leave make room by moving the last row
into their place, so the running rows always fill the first blocks.

The server's side is small: build a :class:`Request`, :meth:`Engine.submit` it, read the text
from the :class:`Sequence` with :meth:`Sequence.pieces` (blocking, for a thread) or
:meth:`Sequence.apieces` (for asyncio), then read :attr:`Sequence.finish_reason`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from charlstm.config import SEED_LIMIT
from charlstm.errors import CharLSTMError
from charlstm.lm import CharLM, piece_decoder
from charlstm.sample import draw_ids, make_stepper, read_prompt, sample_rng

LENGTH, STOP, ABORT = "length", "stop", "abort"
# Seconds between the loop's hand-overs of the GIL to the readers' threads (see _advance).
YIELD_EVERY = 0.001


class EngineFull(CharLSTMError):
    """The engine holds as many sequences as it takes, running and waiting; try again later."""


class EngineClosed(CharLSTMError):
    """The engine was closed (or stopped on an error) and takes no more requests."""


@dataclass(frozen=True, eq=False)
class Request:
    """One sequence to generate: a prompt, already encoded to ids, and its settings.

    ``max_tokens`` ids are generated (characters; bytes for a byte model) unless a stop string
    comes first: generation ends when the text produced contains one of ``stop``, and the text
    returned ends just before it. ``temperature``, ``top_k``, ``top_p`` and ``seed`` are
    ``charlstm sample``'s. ``index`` is the sample's number among several drawn for one prompt
    and seed: sample ``i`` of ``charlstm sample --num-samples N --seed S`` is the request with
    seed ``S`` and index ``i`` (0-based). Settings out of range raise :class:`CharLSTMError`.
    """

    prompt_ids: np.ndarray
    max_tokens: int
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    index: int = 0

    def __post_init__(self) -> None:
        ids = np.asarray(self.prompt_ids)
        if ids.ndim != 1 or len(ids) == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise CharLSTMError("prompt_ids must be a non-empty 1-D array of integer ids")
        ids = ids.astype(np.int64)  # a copy, kept read-only: the engine reads it later
        ids.flags.writeable = False
        object.__setattr__(self, "prompt_ids", ids)
        object.__setattr__(self, "stop", tuple(self.stop))
        _require(self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}")
        _require(
            math.isfinite(self.temperature) and self.temperature >= 0,
            f"temperature must be 0 (greedy) or positive, got {self.temperature}",
        )
        _require(self.top_k >= 0, f"top_k must be 0 (off) or positive, got {self.top_k}")
        _require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _require(
            self.seed is None or 0 <= self.seed < SEED_LIMIT,
            f"seed must be in [0, 2**63), got {self.seed}",
        )
        _require(self.index >= 0, f"index must not be negative, got {self.index}")
        _require(
            all(isinstance(s, str) and s for s in self.stop),
            "stop strings must be non-empty strings",
        )


class Sequence:
    """The handle :meth:`Engine.submit` returns: the text of one request as it is generated.

    Read it once, with :meth:`pieces` from a thread or :meth:`apieces` from asyncio; each piece
    is the text produced since the previous one (a character, or several when the reader fell
    behind). When the iteration ends, :attr:`finish_reason` says why: ``"length"`` (max_tokens
    reached), ``"stop"`` (a stop string came; it is not in the text) or ``"abort"`` (cancelled,
    or the engine closed). Leaving the iteration early (``break``, an exception, a cancelled
    task) cancels the sequence. If the engine failed, the iteration raises its error.
    """

    def __init__(self, request: Request) -> None:
        self.request = request
        self.finish_reason: str | None = None
        self.tokens = 0  # ids generated so far (the completion's length in tokens)
        self._cancelled = False
        self._error: BaseException | None = None
        self._ready = threading.Condition()
        self._text: list[str] = []  # produced, not yet read
        self._wakers: list[Callable[[], None]] = []

    def cancel(self) -> None:
        """Stop generating (the client went away): the sequence leaves the batch at the next
        step and finishes with ``"abort"``; nothing if it has finished already."""
        self._cancelled = True

    @property
    def finished(self) -> bool:
        """Whether the sequence is done (its remaining text may still be unread)."""
        return self.finish_reason is not None

    def pieces(self, timeout: float | None = None) -> Iterator[str]:
        """The text as it comes, blocking; ends when the sequence finishes. Raises
        TimeoutError when ``timeout`` seconds pass without new text."""
        done = False
        try:
            while True:
                with self._ready:
                    if not self._ready.wait_for(lambda: self._text or self.finished, timeout):
                        raise TimeoutError(f"no text for {timeout} s")
                    text, finished = self._take()
                if text:
                    yield text
                elif finished:
                    done = True
                    self._raise_error()
                    return
        finally:
            if not done:
                self.cancel()

    async def apieces(self) -> AsyncIterator[str]:
        """:meth:`pieces` for asyncio: waits without blocking the event loop."""
        loop = asyncio.get_running_loop()
        done = False
        try:
            while True:
                woken = loop.create_future()
                with self._ready:
                    text, finished = self._take()
                    if not text and not finished:
                        self._wakers.append(partial(_wake_soon, loop, woken))
                if text:
                    yield text
                elif finished:
                    done = True
                    self._raise_error()
                    return
                else:
                    await woken
        finally:
            if not done:
                self.cancel()

    def text(self, timeout: float | None = None) -> str:
        """All the text, once the sequence finishes (:meth:`pieces` joined)."""
        return "".join(self.pieces(timeout))

    def _take(self) -> tuple[str, bool]:
        """What is unread, and whether that is all (call holding ``_ready``)."""
        text = "".join(self._text)
        self._text.clear()
        return text, self.finished

    def _raise_error(self) -> None:
        if self._error is not None:
            raise RuntimeError("the sampling engine stopped on an error") from self._error

    def _emit(self, text: str, finish_reason: str | None = None) -> list[Callable[[], None]]:
        """Add text and, if given, finish; the asyncio readers to wake are returned, to be
        woken once the whole step is out."""
        with self._ready:
            if text:
                self._text.append(text)
            if finish_reason is not None:
                self.finish_reason = finish_reason
            self._ready.notify_all()
            wakers, self._wakers = self._wakers, []
        return wakers


class Engine:
    """Generates many requests in one batched loop on a background thread.

    Up to ``max_sequences`` run at once; up to ``max_waiting`` more wait for a free place, and
    beyond that :meth:`submit` raises :class:`EngineFull`. :meth:`start` starts the loop;
    :meth:`close` ends it. Also a context manager: start on entry, ``close()`` on exit.
    """

    def __init__(self, model: CharLM, *, max_sequences: int = 64, max_waiting: int = 16) -> None:
        if max_sequences < 1 or max_waiting < 0:
            raise CharLSTMError("max_sequences must be at least 1 and max_waiting not negative")
        self.model = model
        self.max_sequences, self.max_waiting = max_sequences, max_waiting
        model.net.eval()
        self._step = make_stepper(model.net, max_sequences)
        # Per running row, in row order: the batch the loop thread alone touches.
        self._rows: list[_Row] = []
        self._logits = np.zeros((max_sequences, model.vocab.size), dtype=np.float32)
        self._temperature = np.zeros(max_sequences)
        self._top_k = np.zeros(max_sequences, dtype=np.int64)
        self._top_p = np.zeros(max_sequences)
        # Shared with submitting threads, under _wake: what waits, how many are held, closing.
        self._wake = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._held = 0  # running and waiting
        self._closing = self._drain = False
        self._failed = False
        self._yielded = 0.0  # when the loop last let other threads have the GIL
        self._thread = threading.Thread(target=self._run, name="charlstm-engine", daemon=True)

    @property
    def running(self) -> int:
        """Sequences in the batch now."""
        return len(self._rows)

    def submit(self, request: Request) -> Sequence:
        """Queue ``request`` to join the batch at the next step; its handle. Raises
        :class:`EngineFull` when the engine holds all it takes, :class:`EngineClosed` after
        :meth:`close`, and :class:`CharLSTMError` for ids outside the model's vocabulary."""
        ids = request.prompt_ids
        if ids.min() < 0 or ids.max() >= self.model.vocab.size:
            raise CharLSTMError(
                f"prompt_ids must be in [0, {self.model.vocab.size}), the model's vocabulary"
            )
        sequence = Sequence(request)
        with self._wake:
            if self._closing or self._failed:
                raise EngineClosed("the engine is closed and takes no more requests")
            if self._held >= self.max_sequences + self.max_waiting:
                raise EngineFull(
                    f"the engine is full ({self.max_sequences} running, "
                    f"{self.max_waiting} waiting); try again later"
                )
            self._held += 1
            self._waiting.append(sequence)
            self._wake.notify()
        return sequence

    def start(self) -> None:
        """Start the loop on its thread."""
        self._thread.start()

    def close(self, drain: bool = False) -> None:
        """Stop taking requests and end the loop, returning when it has ended. With ``drain``
        the sequences held finish first; without, they finish now with ``"abort"``."""
        with self._wake:
            self._closing, self._drain = True, drain
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join()
        self._abort_all()  # only left if the loop never ran

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- the loop (its own thread) ------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._next_step():
                pass
        except BaseException as error:  # handed to every reader, whose iteration raises it
            with self._wake:
                self._failed = True
            self._abort_all(error)

    def _next_step(self) -> bool:
        """One step of every running row, after letting in what waits; False to end."""
        with self._wake:
            self._wake.wait_for(lambda: self._waiting or self._rows or self._closing)
            if self._closing and not (self._drain and (self._waiting or self._rows)):
                return False
            dropped = [s for s in self._waiting if s._cancelled]
            if dropped:
                self._waiting = deque(s for s in self._waiting if not s._cancelled)
            joining = [
                self._waiting.popleft()
                for _ in range(min(len(self._waiting), self.max_sequences - len(self._rows)))
            ]
        for sequence in dropped:
            _wake_all(self._finish(sequence, ABORT))
        self._admit(joining)
        wakers: list[Callable[[], None]] = []
        for row in [r for r in self._rows if r.sequence._cancelled]:
            self._leave(row, ABORT, "", wakers)
        _wake_all(wakers)
        if self._rows:
            self._advance()
        return True

    def _admit(self, joining: list[Sequence]) -> None:
        """Read each newcomer's prompt (batch 1; once for requests that share it) into a row.
        One cancelled meanwhile joins too, and leaves before drawing anything."""
        read: dict[bytes, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}
        for sequence in joining:
            request = sequence.request
            key = request.prompt_ids.tobytes()
            if key not in read:
                with torch.inference_mode():
                    prompt = torch.tensor(request.prompt_ids, device=self.model.device)
                    read[key] = read_prompt(self.model.net, prompt)
            logits, state = read[key]
            place = len(self._rows)
            self._step.load(slice(place, place + 1), state)
            self._logits[place] = logits[0, -1].float().cpu().numpy()
            self._temperature[place] = request.temperature
            self._top_k[place] = request.top_k
            self._top_p[place] = request.top_p
            self._rows.append(_Row(sequence, self.model))

    def _advance(self) -> None:
        """Draw each row's next id, hand out the text, let finished rows go, step the rest."""
        count = len(self._rows)
        ids = draw_ids(
            self._logits[:count],
            self._temperature[:count],
            self._top_k[:count],
            self._top_p[:count],
            [row.rng for row in self._rows],
        )
        wakers, finished = [], []
        for row, i in zip(self._rows, ids.tolist(), strict=True):
            text, reason = row.take(i)
            if reason is None:
                if text:
                    wakers += row.sequence._emit(text)
            else:
                finished.append((row, text, reason))
        for row, text, reason in finished:
            place = self._leave(row, reason, text, wakers)
            ids[place] = ids[len(self._rows)]  # the row moved here continues from its own id
        _wake_all(wakers)
        now = time.perf_counter()
        if now - self._yielded >= YIELD_EVERY:
            # Let the readers (and the server's event loop) run: otherwise this thread keeps
            # the GIL for up to the switch interval, 5 ms, hundreds of a small model's
            # characters, and what should stream arrives in lumps. Not after every step: each
            # hand-over costs a single request a third of its speed.
            time.sleep(0)
            self._yielded = now
        if self._rows:
            self._logits[: len(self._rows)] = self._step(ids[: len(self._rows)])

    def _leave(self, row: _Row, reason: str, text: str, wakers: list[Callable[[], None]]) -> int:
        """Take ``row`` out of the batch, the last row moving into its place (returned), and
        finish its sequence (its readers to wake are added to ``wakers``)."""
        place, last = self._rows.index(row), len(self._rows) - 1
        if place != last:
            self._step.move(last, place)
            for array in (self._logits, self._temperature, self._top_k, self._top_p):
                array[place] = array[last]
            self._rows[place] = self._rows[last]
        self._rows.pop()
        wakers += self._finish(row.sequence, reason, text)
        return place

    def _finish(
        self,
        sequence: Sequence,
        reason: str,
        text: str = "",
        error: BaseException | None = None,
    ) -> list[Callable[[], None]]:
        """Count the sequence out, then let its readers see the end (so that a reader who sees
        it can submit again at once)."""
        with self._wake:
            self._held -= 1
        sequence._error = error
        return sequence._emit(text, reason)

    def _abort_all(self, error: BaseException | None = None) -> None:
        """Finish every sequence still held with ``"abort"`` (and the engine's error)."""
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
        rows, self._rows = self._rows, []
        for sequence in [row.sequence for row in rows] + waiting:
            _wake_all(self._finish(sequence, ABORT, error=error))


class _Row:
    """A running sequence's own part of the batch: its generator, the ids still to draw, and
    its text on the way out (decoded, held back while it may be the start of a stop string)."""

    def __init__(self, sequence: Sequence, model: CharLM) -> None:
        request = sequence.request
        self.sequence = sequence
        self.rng = sample_rng(request.seed, request.index)
        self.left = request.max_tokens
        self.decode = piece_decoder(model.vocab)
        self.stop = request.stop
        self.held = ""

    def take(self, i: int) -> tuple[str, str | None]:
        """Id ``i`` drawn: the text now known to be output, and the finish reason if this ends
        the sequence."""
        self.left -= 1
        self.sequence.tokens += 1
        text = self.held + self.decode(i, self.left == 0)
        if self.stop:
            found = [at for at in (text.find(s) for s in self.stop) if at >= 0]
            if found:
                return text[: min(found)], STOP
            # A tail that may still become a stop string waits for the next characters.
            keep = 0 if self.left == 0 else _open_match(text, self.stop)
            text, self.held = text[: len(text) - keep], text[len(text) - keep :]
        return text, LENGTH if self.left == 0 else None


def _open_match(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of ``text`` that begins some stop string."""
    for size in range(min(len(text), max(map(len, stops)) - 1), 0, -1):
        if any(s.startswith(text[-size:]) for s in stops):
            return size
    return 0


def _wake_all(wakers: list[Callable[[], None]]) -> None:
    for wake in wakers:
        wake()


def _wake_soon(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
    """Wake an asyncio reader from the engine's thread. A loop that has closed since has no
    reader left to wake, and must not stop the engine."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_settle, future)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():  # a cancelled reader's future is done already
        future.set_result(None)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise CharLSTMError(message)
