"""``charlstm serve``: a trained model behind an OpenAI-compatible HTTP API and a playground page.

One process: uvicorn runs a FastAPI application on an event loop, and the sampling
:class:`~charlstm.engine.Engine` generates every running sequence together in its own thread.
The routes are ``POST /v1/completions`` (the OpenAI Completions API, streamed as server-sent
events or not), ``GET /v1/models``, ``GET /health``, and the playground: ``GET /`` with its
script and style sheet, and ``GET /curves.png``, the run's loss curves.

Requests name no files: the model, the page and the one picture are fixed when the server
starts, so no request can read a file or load another checkpoint. Every invalid request gets a
400 in OpenAI's error shape naming the field; a full engine answers 429; on SIGTERM (or SIGINT)
the server drains: new requests get 503, running sequences have ``drain_timeout`` seconds to
finish before they end with ``finish_reason: "abort"``, and the process exits with 128 + the
signal's number.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import math
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from charlstm.checkpoint import CONFIG_FILE, resolve_checkpoint, run_directory_of
from charlstm.config import DEFAULT_PROMPT, SEED_LIMIT, UNKNOWN_POLICIES, SampleConfig
from charlstm.engine import Engine, EngineClosed, EngineFull, Request, Sequence
from charlstm.errors import CharLSTMError
from charlstm.lm import CharLM
from charlstm.plot import CURVES_FILE

# The defaults of a request: those of `charlstm sample`, not OpenAI's (16 tokens, temperature
# 1), so that the API, the command and the Python API draw the same text for the same settings.
_SAMPLE = SampleConfig()
# OpenAI's limit on stop sequences.
MAX_STOP = 4
# Any k at or above the vocabulary's size keeps every character; the bound keeps k in an int32.
MAX_TOP_K = 2**31 - 1
# Parameters of OpenAI's Completions API that a character model has no use for: accepted at
# the value that means "off", refused otherwise (by name).
_NEUTRAL = {
    "logprobs": (None,),
    "suffix": (None,),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "logit_bias": (None, {}),
}
_FIELDS = frozenset(
    {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop"}
    | {"stream", "stream_options", "echo", "best_of", "user", *_NEUTRAL}
)
_PLAYGROUND = ("index.html", "playground.js", "playground.css")
_MEDIA = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}  # fmt: skip
# SSE responses must reach the client as they are written, through any proxy.
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class ServeLimits:
    """What one server accepts: the flags of ``charlstm serve`` beside the checkpoint."""

    max_tokens: int = 2000  # characters one choice may ask for
    max_prompt: int = 10_000  # characters of one prompt
    max_n: int = 16  # choices in one request (n times the number of prompts)
    max_sequences: int = 64  # sequences generated at once; one more answers 429
    unknown: str = "error"  # prompt characters outside the vocabulary: error, skip or replace
    drain_timeout: float = 10.0  # seconds running sequences get to finish on SIGTERM

    def validate(self) -> None:
        """Raise CharLSTMError naming the first flag out of range."""
        for name in ("max_tokens", "max_prompt", "max_n", "max_sequences"):
            if getattr(self, name) < 1:
                raise CharLSTMError(f"{_flag(name)} must be at least 1, got {getattr(self, name)}")
        if not (math.isfinite(self.drain_timeout) and self.drain_timeout >= 0):
            raise CharLSTMError(
                f"--drain-timeout must be 0 or more seconds, got {self.drain_timeout}"
            )
        if self.unknown not in UNKNOWN_POLICIES:
            raise CharLSTMError(f"--unknown must be one of {', '.join(UNKNOWN_POLICIES)}")

    @property
    def default_max_tokens(self) -> int:
        """A request's length when it names none: `charlstm sample`'s, within the cap."""
        return min(_SAMPLE.length, self.max_tokens)

    @property
    def body_bytes(self) -> int:
        """The largest request body worth reading: ``max_n`` prompts of ``max_prompt``
        characters, each written as a 12-byte JSON escape pair, and room for the rest."""
        return 65_536 + 12 * self.max_prompt * self.max_n


@dataclass(frozen=True)
class ModelCard:
    """What the server tells about its model (``/v1/models`` and the playground's card)."""

    name: str  # the run directory's name: the `model` a request must give
    created: int  # when the checkpoint was written, in Unix seconds
    cell: str
    layers: int
    hidden: int
    embed: int
    parameters: int
    vocabulary: int
    corpus: str | None
    step: int | None
    val_bpc: float | None
    curves: Path | None  # the run's loss-curve picture; never shown to clients

    @classmethod
    def of(cls, model: CharLM, path: str | Path) -> ModelCard:
        """The card of ``model``, loaded from ``path`` (a run or checkpoint directory)."""
        run_dir = run_directory_of(path)
        facts = model.summary()
        curves = run_dir / CURVES_FILE
        return cls(
            name=run_dir.name,
            created=int((resolve_checkpoint(path) / CONFIG_FILE).stat().st_mtime),
            cell=facts["cell"],
            layers=facts["layers"],
            hidden=facts["hidden"],
            embed=facts["embed"],
            parameters=facts["parameters"],
            vocabulary=facts["vocabulary"],
            corpus=facts["corpus"],
            step=facts["step"],
            val_bpc=facts["val_bpc"],
            curves=curves if curves.is_file() else None,
        )

    def entry(self, limits: ServeLimits) -> dict[str, Any]:
        """This model as an entry of ``/v1/models``: OpenAI's fields, then charlstm's own."""
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "charlstm",
            "charlstm": {
                "cell": self.cell,
                "layers": self.layers,
                "hidden": self.hidden,
                "embed": self.embed,
                "parameters": self.parameters,
                "vocabulary": self.vocabulary,
                "corpus": self.corpus,
                "step": self.step,
                "val_bpc": self.val_bpc,
                "curves": "/curves.png" if self.curves else None,
                "limits": {
                    "max_tokens": limits.max_tokens,
                    "max_prompt": limits.max_prompt,
                    "max_n": limits.max_n,
                    "max_sequences": limits.max_sequences,
                },
                "defaults": {
                    "max_tokens": limits.default_max_tokens,
                    "temperature": _SAMPLE.temperature,
                    "top_p": _SAMPLE.top_p,
                    "top_k": _SAMPLE.top_k,
                },
            },
        }


# ---- errors -----------------------------------------------------------------------------------


class ApiError(Exception):
    """An answer other than 200, in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = (
            status, message, param, kind, code
        )  # fmt: skip

    def response(self) -> JSONResponse:
        """``{"error": {"message", "type", "param", "code"}}`` with this error's status."""
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse({"error": body}, status_code=self.status, headers=headers)


def _invalid(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param)


# ---- a completion request, read and checked -------------------------------------------------


@dataclass(frozen=True)
class Completion:
    """A checked ``/v1/completions`` request."""

    prompts: tuple[str, ...]
    prompt_ids: tuple[np.ndarray, ...]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    n: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    echo: bool
    include_usage: bool

    def requests(self) -> list[Request]:
        """One engine request per choice, in OpenAI's order: prompt by prompt, n each.
        Sample i of a prompt is the engine's sample ``i`` of ``seed``: what
        ``charlstm sample --num-samples n --seed S`` prints as sample i + 1."""
        return [
            Request(
                prompt_ids=ids,
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                top_k=self.top_k,
                top_p=self.top_p,
                seed=self.seed,
                stop=self.stop,
                index=i,
            )
            for ids in self.prompt_ids
            for i in range(self.n)
        ]

    @property
    def choice_prompts(self) -> list[str]:
        """The prompt of each choice, in the choices' order."""
        return [prompt for prompt in self.prompts for _ in range(self.n)]

    @property
    def prompt_tokens(self) -> int:
        """Symbols the model reads: characters (bytes, for a byte model), each prompt once."""
        return sum(len(ids) for ids in self.prompt_ids)


def parse_completion(body: Any, model: CharLM, card: ModelCard, limits: ServeLimits) -> Completion:
    """Check a request body and encode its prompts; raise ApiError naming the first bad field."""
    if not isinstance(body, dict):
        raise _invalid("body", "the request body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise _invalid(unknown[0], f"Unrecognized request argument supplied: {unknown[0]}")
    _check_model(body.get("model"), card)
    for name, neutral in _NEUTRAL.items():
        if body.get(name) not in neutral:
            raise _invalid(name, f"{name} is not supported by a character model; leave it out")
    n = _integer(body, "n", 1, 1, limits.max_n, "--max-n")
    if body.get("best_of") not in (None, n):
        raise _invalid("best_of", "best_of is not supported; leave it out (or equal to n)")
    given = body.get("prompt")
    prompts = _prompts(_SAMPLE.prompt if given is None else given, limits)
    if n * len(prompts) > limits.max_n:
        raise _invalid(
            "n", f"n x {len(prompts)} prompts = {n * len(prompts)} choices, more than this "
            f"server's --max-n {limits.max_n}",
        )  # fmt: skip
    stream = _boolean(body, "stream")
    return Completion(
        prompts=prompts,
        prompt_ids=tuple(_encode(model, p, limits.unknown) for p in prompts),
        max_tokens=_integer(
            body, "max_tokens", limits.default_max_tokens, 1, limits.max_tokens, "--max-tokens"
        ),
        temperature=_number(body, "temperature", _SAMPLE.temperature, "0 (greedy) or more", 0),
        top_p=_top_p(body),
        top_k=_integer(body, "top_k", _SAMPLE.top_k, 0, MAX_TOP_K),
        n=n,
        seed=_seed(body),
        stop=_stop(body),
        stream=stream,
        echo=_boolean(body, "echo"),
        include_usage=_include_usage(body, stream),
    )


def _check_model(name: Any, card: ModelCard) -> None:
    if name is None:
        raise _invalid("model", f"model is required: this server serves '{card.name}'")
    if not isinstance(name, str):
        raise _invalid("model", f"model must be a string, got {_kind(name)}")
    if name != card.name:
        raise ApiError(
            404,
            f"The model '{name}' does not exist: this server serves '{card.name}'",
            param="model",
            code="model_not_found",
        )


def _prompts(value: Any, limits: ServeLimits) -> tuple[str, ...]:
    prompts = [value] if isinstance(value, str) else value
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise _invalid(
            "prompt", "prompt must be a string or a list of strings (token ids are not accepted: "
            "the model reads characters)",
        )  # fmt: skip
    if not prompts:
        raise _invalid("prompt", "prompt is an empty list; give at least one string")
    for text in prompts:
        if not text:
            raise _invalid("prompt", "prompt is empty; give at least one character")
        if len(text) > limits.max_prompt:
            raise _invalid(
                "prompt", f"prompt has {len(text):,} characters, more than this server's "
                f"--max-prompt {limits.max_prompt:,}",
            )  # fmt: skip
    return tuple(prompts)


def _encode(model: CharLM, prompt: str, unknown: str) -> np.ndarray:
    """The prompt's ids under the server's ``--unknown`` policy; as in `charlstm sample`, the
    default newline becomes the model's stand-in for one when its text had none."""
    policy = "replace" if prompt == DEFAULT_PROMPT else unknown
    try:
        ids = model.vocab.encode(prompt, unknown=policy, what="prompt")
    except CharLSTMError as e:  # the vocabulary's message ends in a hint for the command line
        found = str(e).split(" (use --unknown")[0]
        raise _invalid(
            "prompt", f"{found} (this server was started with --unknown error)"
        ) from None
    except UnicodeEncodeError:  # a lone surrogate, which a byte model cannot encode
        raise _invalid(
            "prompt", "prompt is not valid Unicode (it holds a lone surrogate)"
        ) from None
    if len(ids) == 0:
        raise _invalid("prompt", "no character of the prompt is in the model's vocabulary")
    return ids


def _integer(
    body: dict, name: str, default: int, low: int, high: int, flag: str | None = None
) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        bound = f"from {low} to {high:,}" + (f" (this server's {flag})" if flag else "")
        raise _invalid(name, f"{name} must be an integer {bound}, got {_shown(value)}")
    return value


def _number(body: dict, name: str, default: float, rule: str, low: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or not math.isfinite(value) or value < low:
        raise _invalid(name, f"{name} must be a number, {rule}, got {_shown(value)}")
    return float(value)


def _top_p(body: dict) -> float:
    value = body.get("top_p")
    if value is None:
        return _SAMPLE.top_p
    if not _is_number(value) or not 0 < value <= 1:
        raise _invalid("top_p", f"top_p must be a number in (0, 1], got {_shown(value)}")
    return float(value)


def _seed(body: dict) -> int | None:
    value = body.get("seed")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
        raise _invalid("seed", f"seed must be an integer in [0, 2**63), got {_shown(value)}")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or not all(isinstance(s, str) and s for s in stops)
        or len(stops) > MAX_STOP
    ):
        raise _invalid(
            "stop", f"stop must be a non-empty string or a list of up to {MAX_STOP} of them"
        )
    return tuple(stops)


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid(name, f"{name} must be true or false, got {_shown(value)}")
    return value


def _include_usage(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise _invalid("stream_options", "stream_options is only allowed with stream: true")
    # include_obfuscation pads OpenAI's chunks against size side channels: accepted, not needed.
    if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
        raise _invalid("stream_options", 'stream_options must be {"include_usage": true|false}')
    _boolean(options, "include_obfuscation")
    return _boolean(options, "include_usage")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "a number"
    )


def _shown(value: Any) -> str:
    """A request's value as JSON, cut short: error messages stay one short line."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ---- generating -------------------------------------------------------------------------------


class Choices:
    """The sequences of one request, submitted together: all are running, or none."""

    def __init__(self, engine: Engine, completion: Completion, limits: ServeLimits) -> None:
        self.sequences: list[Sequence] = []
        try:
            for request in completion.requests():
                self.sequences.append(engine.submit(request))
        except EngineFull:
            self.cancel()
            raise ApiError(
                429,
                f"the server is generating as many sequences as it may (--max-sequences "
                f"{limits.max_sequences}); retry shortly",
                kind="rate_limit_error",
                code="server_full",
            ) from None
        except EngineClosed:
            self.cancel()
            raise _shutting_down() from None

    def cancel(self) -> None:
        """Stop every sequence now (their client went away)."""
        for sequence in self.sequences:
            sequence.cancel()

    async def pieces(self) -> AsyncIterator[tuple[int, str]]:
        """(choice index, text) as the engine writes it, all choices interleaved; text that
        arrived together comes as one piece (one SSE event, not one per character)."""
        if len(self.sequences) == 1:  # the common case, without a task and a queue per piece
            async for piece in self.sequences[0].apieces():
                yield 0, piece
            return
        queue: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()

        async def forward(index: int, sequence: Sequence) -> None:
            try:
                async for piece in sequence.apieces():
                    queue.put_nowait((index, piece))
            finally:
                queue.put_nowait((index, None))

        tasks = [asyncio.ensure_future(forward(i, s)) for i, s in enumerate(self.sequences)]
        try:
            running = len(tasks)
            while running:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                texts: dict[int, list[str]] = {}
                for index, piece in batch:
                    if piece is None:
                        running -= 1
                    else:
                        texts.setdefault(index, []).append(piece)
                for index, parts in texts.items():
                    yield index, "".join(parts)
            for task in tasks:
                task.result()  # an error in the engine's stream surfaces here
        finally:
            for task in tasks:
                task.cancel()

    def finish_reason(self, index: int) -> str:
        """``length``, ``stop`` or ``abort`` (cancelled, or cut off by a shutdown)."""
        return self.sequences[index].finish_reason or "abort"


def _completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


async def _until_disconnect(receive: Receive, choices: Choices) -> None:
    """Cancel the choices as soon as the client goes away: a closed connection must not leave
    sequences running for nobody."""
    while (await receive())["type"] != "http.disconnect":
        pass
    choices.cancel()


async def complete(
    http: HttpRequest, completion: Completion, choices: Choices, card: ModelCard
) -> dict[str, Any]:
    """The whole answer of a request without ``stream``."""
    watcher = asyncio.ensure_future(_until_disconnect(http.receive, choices))
    try:
        parts: list[list[str]] = [[] for _ in choices.sequences]
        async for index, text in choices.pieces():
            parts[index].append(text)
        texts = ["".join(p) for p in parts]
    finally:
        watcher.cancel()
        choices.cancel()  # a no-op for finished sequences; stops the rest if this was cancelled
    prompts = completion.choice_prompts
    result = [
        {
            "text": (prompt if completion.echo else "") + text,
            "index": index,
            "logprobs": None,
            "finish_reason": choices.finish_reason(index),
        }
        for index, (prompt, text) in enumerate(zip(prompts, texts, strict=True))
    ]
    return {
        "id": _completion_id(),
        "object": "text_completion",
        "created": int(time.time()),
        "model": card.name,
        "choices": result,
        "usage": _usage(completion, sum(len(t) for t in texts)),
    }


async def stream(completion: Completion, choices: Choices, card: ModelCard) -> AsyncIterator[str]:
    """The answer of a request with ``stream``: server-sent events in OpenAI's
    ``text_completion`` chunk shape, a last chunk per choice with its ``finish_reason``, the
    usage if asked for, then ``data: [DONE]``."""
    head = {"id": _completion_id(), "object": "text_completion", "created": int(time.time()),
            "model": card.name}  # fmt: skip

    def event(index: int, text: str, finish: str | None = None) -> str:
        choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**head, 'choices': [choice]}, ensure_ascii=False)}\n\n"

    written = 0
    if completion.echo:
        for index, prompt in enumerate(completion.choice_prompts):
            yield event(index, prompt)
    async for index, text in choices.pieces():
        written += len(text)
        yield event(index, text)
    for index in range(len(choices.sequences)):
        yield event(index, "", choices.finish_reason(index))
    if completion.include_usage:
        usage = {**head, "choices": [], "usage": _usage(completion, written)}
        yield f"data: {json.dumps(usage)}\n\n"
    yield "data: [DONE]\n\n"


def _usage(completion: Completion, characters: int) -> dict[str, int]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": characters,
        "total_tokens": completion.prompt_tokens + characters,
    }


# ---- the application --------------------------------------------------------------------------


class Drain:
    """Whether the server is shutting down (then every new request is refused with 503), and
    how many completion requests are in flight (what a drain waits for)."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0

    @contextlib.contextmanager
    def flight(self) -> Iterator[None]:
        """Count a request in flight for the duration of the block."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down")


class _RefuseWhileDraining:
    """ASGI middleware: 503 in OpenAI's shape for any request that arrives during a drain."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app, self.drain = app, drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.drain.draining:
            await _shutting_down().response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(
    model: CharLM, engine: Engine, card: ModelCard, limits: ServeLimits, drain: Drain
) -> FastAPI:
    """The FastAPI application: the API, the health check and the playground."""
    app = FastAPI(title="charlstm", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_RefuseWhileDraining, drain=drain)
    pages = {name: resources.files("charlstm.playground").joinpath(name).read_bytes()
             for name in _PLAYGROUND}  # fmt: skip

    @app.exception_handler(ApiError)
    async def api_error(request: HttpRequest, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: HttpRequest, error: HTTPException) -> JSONResponse:
        code = "not_found" if error.status_code == 404 else None
        return ApiError(error.status_code, str(error.detail), code=code).response()

    @app.exception_handler(Exception)
    async def server_error(request: HttpRequest, error: Exception) -> JSONResponse:
        message = f"internal error: {type(error).__name__}"
        return ApiError(500, message, kind="server_error").response()

    @app.post("/v1/completions")
    async def completions(http: HttpRequest) -> Response:
        completion = parse_completion(await _json_body(http, limits), model, card, limits)
        choices = Choices(engine, completion, limits)
        if completion.stream:
            return _EventStream(stream(completion, choices, card), choices, drain)
        with drain.flight():
            return JSONResponse(await complete(http, completion, choices, card))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card.entry(limits)]}

    @app.get("/v1/models/{name}")
    async def one_model(name: str) -> dict[str, Any]:
        _check_model(name, card)
        return card.entry(limits)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": card.name, "running": engine.running,
                "requests": drain.in_flight}  # fmt: skip

    @app.get("/curves.png")
    async def curves() -> Response:
        # The one picture the card shows, at a path fixed when the server started.
        if card.curves is None or not card.curves.is_file():
            raise ApiError(404, "this run has no curves.png", code="not_found")
        return Response(card.curves.read_bytes(), media_type="image/png")

    for name in _PLAYGROUND:
        _add_page(app, "/" if name == "index.html" else f"/{name}", pages[name], name)
    return app


class _EventStream(StreamingResponse):
    """A streamed completion: counted in flight while it is written, and its sequences
    cancelled however it ends, even if the client left before its first chunk."""

    def __init__(self, events: AsyncIterator[str], choices: Choices, drain: Drain) -> None:
        super().__init__(events, media_type="text/event-stream", headers=_STREAM_HEADERS)
        self.choices, self.drain = choices, drain
        drain.in_flight += 1  # from now: a drain must not miss a response not yet begun

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.choices.cancel()
            self.drain.in_flight -= 1


def _add_page(app: FastAPI, route: str, content: bytes, name: str) -> None:
    media = _MEDIA[Path(name).suffix]

    @app.get(route, include_in_schema=False)
    async def page() -> Response:
        return Response(content, media_type=media)


async def _json_body(http: HttpRequest, limits: ServeLimits) -> Any:
    """The request's JSON, read up to the largest body a valid request can have."""
    if http.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        # A browser sends a cross-site form or text/plain POST without asking first; JSON it
        # does not: so no other web page can make this server generate.
        raise _invalid("body", "the request body must be JSON (Content-Type: application/json)")
    body = bytearray()
    async for chunk in http.stream():
        body += chunk
        if len(body) > limits.body_bytes:
            raise ApiError(413, "the request body is larger than any valid request", param="body")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise _invalid("body", f"the request body is not valid JSON: {e}") from None


# ---- the process ------------------------------------------------------------------------------


class _DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM or SIGINT drains before it stops (see the module's
    docstring) and the process exits with 128 + the signal rather than dying of it; a second
    signal stops at once."""

    def __init__(self, config: uvicorn.Config, engine: Engine, drain: Drain, timeout: float):
        super().__init__(config)
        self.engine, self.drain, self.timeout = engine, drain, timeout
        self.signal: int | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tasks: set[asyncio.Task] = set()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.signal is not None:  # a second signal: abort what runs and stop now
            self.engine.close(drain=False)
            self.should_exit = self.force_exit = True
            return
        self.signal = sig
        self.drain.draining = True
        if self.loop is None:  # not started yet: nothing runs, nothing to drain
            self.should_exit = True
            return
        # A signal handler may not await: the drain runs as a task on the server's loop.
        self.loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        task = asyncio.ensure_future(self._drain())
        self.tasks.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self.tasks.discard)

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.timeout
        while self.drain.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.engine.close(drain=False)  # what still runs ends with finish_reason "abort"
        self.should_exit = True  # uvicorn then waits for the responses to be written


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (0: a free port), or CharLSTMError."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise CharLSTMError(f"cannot listen on {host} port {port}: {e.strerror or e}") from None
    return sock


def is_loopback(sock: socket.socket) -> bool:
    """Whether only this machine can reach the socket."""
    return ipaddress.ip_address(sock.getsockname()[0]).is_loopback


def url_of(sock: socket.socket) -> str:
    """``http://host:port`` of a listening socket, the host bracketed if IPv6."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(
    path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServeLimits = ServeLimits(),
    device: str = "auto",
    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> int:
    """Serve the model at ``path`` until SIGTERM or SIGINT; returns the exit status
    (128 + the signal's number). ``say`` gets the lines meant for the operator."""
    limits.validate()
    sock = bind(host, port)  # first: a taken port is refused before seconds of loading
    try:
        model = CharLM.load(path, device=device)
        card = ModelCard.of(model, path)
        # Nothing waits for a place: a full server says so at once (429) rather than queueing.
        engine = Engine(model, max_sequences=limits.max_sequences, max_waiting=0)
        drain = Drain()
        app = create_app(model, engine, card, limits, drain)
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5
        )
        server = _DrainingServer(config, engine, drain, limits.drain_timeout)
        url = url_of(sock)
        if not is_loopback(sock):
            say(f"warning: serving on {url}, reachable from other machines, without authentication")
        say(f"serving {card.name} ({model!r}) at {url}/ (playground) and {url}/v1 (OpenAI API)")
        engine.start()
        try:
            server.run(sockets=[sock])
        finally:
            engine.close(drain=False)
    finally:
        sock.close()
    return 128 + server.signal if server.signal else 0
