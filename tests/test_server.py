"""`charlstm serve`: a real server process on a loopback port, driven by real clients (the
official ``openai`` package and raw ``httpx``). Every wait is bounded and every server is
stopped by its fixture."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_env, refused, run_cli

import charlstm

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

START_TIMEOUT = 120  # seconds for a server to load its model and answer /health
REQUEST_TIMEOUT = 60  # seconds for any one request
ROMEO = "ROMEO:"


class Server:
    """A ``charlstm serve RUN --port 0`` process; its URL is read from its first line."""

    def __init__(self, run: Path, data_dir: Path, *flags: object) -> None:
        command = [sys.executable, "-m", "charlstm", "serve", str(run), "--port", "0"]
        self.process = subprocess.Popen(
            [*command, *map(str, flags)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, encoding="utf-8", env=cli_env(data_dir),
        )  # fmt: skip
        self.lines: list[str] = []
        self.found = threading.Event()
        self.url = ""
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            address = re.search(r"at (http://127\.0\.0\.1:\d+)/ ", line)
            if address and not self.found.is_set():
                self.url = address.group(1)
                self.found.set()
        self.found.set()  # the process ended: nothing more will come

    def wait_ready(self) -> Server:
        """Return once /health answers 200 (or fail with the server's own words)."""
        deadline = time.monotonic() + START_TIMEOUT
        assert self.found.wait(START_TIMEOUT) and self.url, self.stderr()
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the server did not become healthy: {self.stderr()}")

    def stderr(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        """SIGTERM, then the exit status (killed if it will not go)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise AssertionError(f"the server ignored SIGTERM: {self.stderr()}") from None

    @property
    def api(self) -> str:
        return f"{self.url}/v1"

    def client(self) -> Any:
        """The official OpenAI client, pointed here; no retries, so a 429 stays a 429."""
        return openai.OpenAI(
            base_url=self.api, api_key="none", max_retries=0, timeout=REQUEST_TIMEOUT
        )

    def post(self, body: dict[str, Any], timeout: Any = REQUEST_TIMEOUT) -> httpx.Response:
        return httpx.post(f"{self.api}/completions", json=body, timeout=timeout)

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/health", timeout=REQUEST_TIMEOUT).json()


def start_server(run: Path, data_dir: Path, *flags: object) -> Iterator[Server]:
    """A ready server for a fixture, stopped (and checked to have printed no traceback) after."""
    server = Server(run, data_dir, *flags)
    try:
        yield server.wait_ready()
    finally:
        server.stop()
        assert "Traceback" not in server.stderr(), server.stderr()


@pytest.fixture(scope="module")
def server(trained_run: Path, session_data_dir: Path) -> Iterator[Server]:
    """The default server of the tiny run."""
    yield from start_server(trained_run, session_data_dir)


@pytest.fixture(scope="module")
def one_slot(trained_run: Path, session_data_dir: Path) -> Iterator[Server]:
    """A server that generates one sequence at a time, takes very long requests and skips
    prompt characters the model does not know."""
    yield from start_server(
        trained_run, session_data_dir, "--max-sequences", "1", "--max-tokens", "1000000",
        "--unknown", "skip",
    )  # fmt: skip


@pytest.fixture(scope="module")
def model(trained_run: Path) -> charlstm.CharLM:
    """The served model, loaded in this process: what a request alone must give."""
    return charlstm.load(str(trained_run), device="cpu")


def sse_chunks(response: httpx.Response) -> list[dict[str, Any] | str]:
    """The events of a streamed response: parsed chunks, and "[DONE]"."""
    events: list[dict[str, Any] | str] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def streamed_texts(events: list[dict[str, Any] | str]) -> tuple[dict[int, str], dict[int, str]]:
    """Per choice index: the text of a stream's chunks, and its finish reason."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for event in events:
        if isinstance(event, str):
            continue
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            if choice["finish_reason"]:
                reasons[choice["index"]] = choice["finish_reason"]
    return texts, reasons


# ---- what a request returns -----------------------------------------------------------------


@pytest.mark.slow
def test_streamed_characters_equal_charlstm_sample(
    server: Server, trained_run: Path, session_data_dir: Path, tmp_path: Path
) -> None:
    sample = run_cli(
        ["sample", trained_run, "--prompt", ROMEO, "--length", 200, "--seed", 7, "--no-echo"],
        session_data_dir, tmp_path,
    )  # fmt: skip
    assert sample.returncode == 0, sample.stderr
    expected = sample.stdout[:-1]  # the command ends its sample with a newline
    assert len(expected) == 200

    client = server.client()
    chunks = list(
        client.completions.create(model="tiny", prompt=ROMEO, max_tokens=200, seed=7, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert all(c.object == "text_completion" and c.model == "tiny" for c in chunks)
    assert len(chunks) >= 2  # text, then the chunk that ends the choice (a slow reader: one)
    assert chunks[-1].choices[0].finish_reason == "length"

    whole = client.completions.create(model="tiny", prompt=ROMEO, max_tokens=200, seed=7)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.choices[0].text == expected
    assert whole.choices[0].finish_reason == "length" and whole.choices[0].logprobs is None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (6, 200)
    assert whole.usage.total_tokens == 206


@pytest.mark.slow
def test_defaults_are_charlstm_samples(server: Server, model: charlstm.CharLM) -> None:
    """No settings but the seed: 500 characters from a newline at temperature 0.8."""
    answer = server.post({"model": "tiny", "seed": 3}).json()
    assert answer["choices"][0]["text"] == model.generate(seed=3)
    assert answer["usage"]["completion_tokens"] == 500
    nulls = {"prompt": None, "max_tokens": None, "temperature": None, "stop": None, "n": None}
    again = server.post({"model": "tiny", "seed": 3, **nulls}).json()  # null: the default
    assert again["choices"] == answer["choices"]


@pytest.mark.slow
def test_settings_reach_the_sampler(server: Server, model: charlstm.CharLM) -> None:
    settings = {"temperature": 1.3, "top_k": 5, "top_p": 0.9, "seed": 11}
    answer = server.post({"model": "tiny", "prompt": "JULIET:", "max_tokens": 120, **settings})
    assert answer.json()["choices"][0]["text"] == model.generate("JULIET:", 120, **settings)
    through_openai = server.client().completions.create(
        model="tiny", prompt="JULIET:", max_tokens=120, temperature=1.3, top_p=0.9, seed=11,
        extra_body={"top_k": 5},  # an extension: the client sends it as it is
    )  # fmt: skip
    assert through_openai.choices[0].text == model.generate("JULIET:", 120, **settings)
    greedy = server.post({"model": "tiny", "prompt": "A", "max_tokens": 50, "temperature": 0})
    assert greedy.json()["choices"][0]["text"] == model.generate("A", 50, temperature=0)


@pytest.mark.slow
def test_echo(server: Server, model: charlstm.CharLM) -> None:
    body = {"model": "tiny", "prompt": ROMEO, "max_tokens": 40, "seed": 1, "echo": True}
    expected = ROMEO + model.generate(ROMEO, 40, seed=1)
    assert server.post(body).json()["choices"][0]["text"] == expected
    with httpx.stream(
        "POST", f"{server.api}/completions", json={**body, "stream": True}, timeout=60
    ) as response:
        events = sse_chunks(response)
    assert events[0]["choices"][0]["text"] == ROMEO  # the prompt comes first, alone
    assert streamed_texts(events)[0][0] == expected


@pytest.mark.slow
def test_stop(server: Server, model: charlstm.CharLM) -> None:
    free = model.generate(ROMEO, 300, seed=5)
    stop = free[100:102]
    cut = free.find(stop)
    body = {"model": "tiny", "prompt": ROMEO, "max_tokens": 300, "seed": 5}
    answer = server.post({**body, "stop": [stop, "never seen ~~"]}).json()["choices"][0]
    assert (answer["text"], answer["finish_reason"]) == (free[:cut], "stop")
    with httpx.stream(
        "POST", f"{server.api}/completions", json={**body, "stop": stop, "stream": True},
        timeout=REQUEST_TIMEOUT,
    ) as response:  # fmt: skip
        texts, reasons = streamed_texts(sse_chunks(response))
    assert (texts[0], reasons[0]) == (free[:cut], "stop")


@pytest.mark.slow
def test_n_choices_are_the_samples_of_one_seed(server: Server, model: charlstm.CharLM) -> None:
    """Choice i is sample i of `charlstm sample --num-samples n --seed S`, streamed or not."""
    expected = model.generate_batch(3, ROMEO, 80, seed=9)
    body = {"model": "tiny", "prompt": ROMEO, "max_tokens": 80, "seed": 9, "n": 3}
    choices = server.post(body).json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert [c["text"] for c in choices] == expected
    with httpx.stream(
        "POST", f"{server.api}/completions", json={**body, "stream": True}, timeout=60
    ) as response:
        texts, reasons = streamed_texts(sse_chunks(response))
    assert [texts[i] for i in range(3)] == expected
    assert reasons == {0: "length", 1: "length", 2: "length"}


@pytest.mark.slow
def test_list_of_prompts(server: Server, model: charlstm.CharLM) -> None:
    body = {"model": "tiny", "prompt": ["KING:", "QUEEN:"], "max_tokens": 50, "seed": 2, "n": 2}
    answer = server.post(body).json()
    expected = model.generate_batch(2, "KING:", 50, seed=2) + model.generate_batch(
        2, "QUEEN:", 50, seed=2
    )
    assert [c["text"] for c in answer["choices"]] == expected
    assert answer["usage"] == {"prompt_tokens": 11, "completion_tokens": 200, "total_tokens": 211}


@pytest.mark.slow
def test_stream_usage_when_asked(server: Server) -> None:
    body = {"model": "tiny", "prompt": ROMEO, "max_tokens": 30, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{server.api}/completions", json=body, timeout=60) as response:
        events = sse_chunks(response)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == []
    assert events[-2]["usage"] == {"prompt_tokens": 6, "completion_tokens": 30, "total_tokens": 36}


@pytest.mark.slow
def test_models_and_health(server: Server, model: charlstm.CharLM) -> None:
    listed = server.client().models.list().data
    assert [m.id for m in listed] == ["tiny"]
    card = httpx.get(f"{server.api}/models", timeout=60).json()["data"][0]["charlstm"]
    assert card["cell"] == "lstm" and (card["layers"], card["hidden"]) == (2, 64)
    assert card["parameters"] == model.net.num_parameters()
    assert card["corpus"] == model.info["corpus"]["name"]
    assert card["val_bpc"] == pytest.approx(model.info["val"]["bpc"])
    assert card["curves"] == "/curves.png"
    assert httpx.get(f"{server.api}/models/tiny", timeout=60).json()["id"] == "tiny"
    assert server.health()["status"] == "ok"


@pytest.mark.slow
def test_unknown_model_is_404(server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        server.client().completions.create(model="gpt-4", prompt="hi", max_tokens=5)
    error = raised.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "gpt-4" in error["message"] and "tiny" in error["message"]
    assert httpx.get(f"{server.api}/models/other", timeout=60).status_code == 404


# ---- what a request may not do --------------------------------------------------------------

BAD_FIELDS = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2001}, "max_tokens"),
    ({"max_tokens": 10.5}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2**40}, "top_k"),
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
    ({"n": 9, "prompt": ["a", "b"]}, "n"),
    ({"seed": -1}, "seed"),
    ({"seed": True}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"stop": ""}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": 3}, "stop"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": "x" * 10_001}, "prompt"),
    ({"stream": "yes"}, "stream"),
    ({"echo": 1}, "echo"),
    ({"logprobs": 5}, "logprobs"),
    ({"suffix": "end"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"model": None}, "model"),
    ({"model": 7}, "model"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("change", "field"), BAD_FIELDS, ids=[f for _, f in BAD_FIELDS])
def test_bad_field_is_400_naming_it(server: Server, change: dict, field: str) -> None:
    body = {"model": "tiny", "prompt": ROMEO, "max_tokens": 10, **change}
    response = server.post({k: v for k, v in body.items() if v is not None})  # None: left out
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == field
    assert field in error["message"]
    assert "\n" not in error["message"] and "Traceback" not in error["message"]


@pytest.mark.slow
def test_unknown_prompt_characters_are_named(server: Server) -> None:
    response = server.post({"model": "tiny", "prompt": "snow ☃ and ☂", "max_tokens": 5})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "prompt"
    assert "☃" in error["message"] and "☂" in error["message"]


@pytest.mark.slow
def test_a_body_that_is_not_json(server: Server) -> None:
    url = f"{server.api}/completions"
    for content, kind in (("{not json", "application/json"), ("[1, 2]", "application/json"),
                          ('{"model": "tiny"}', "text/plain")):  # fmt: skip
        response = httpx.post(url, content=content, headers={"Content-Type": kind}, timeout=60)
        assert response.status_code == 400, content
        assert response.json()["error"]["param"] == "body"


@pytest.mark.slow
def test_the_openai_client_raises_bad_request(server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        server.client().completions.create(model="tiny", prompt=ROMEO, max_tokens=5, top_p=2)
    assert raised.value.body["param"] == "top_p"


# URLs that would reach the run's files if any route mapped URLs to files.
FILE_PROBES = (
    "/best/config.json",
    "/curves.png/../best/config.json",
    "/..%2Fbest%2Fconfig.json",
    "/static/../../etc/passwd",
    "/metrics.jsonl",
    "/playground/index.html",
)


@pytest.mark.slow
def test_no_request_reads_files(server: Server, trained_run: Path) -> None:
    """Only the fixed routes answer: nothing maps a URL to a file."""
    assert (trained_run / "curves.png").is_file()
    png = httpx.get(f"{server.url}/curves.png", timeout=60)
    assert png.headers["content-type"] == "image/png"
    assert png.content == (trained_run / "curves.png").read_bytes()
    for path in FILE_PROBES:
        response = httpx.get(f"{server.url}{path}", timeout=60)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"


@pytest.mark.slow
def test_playground_page_is_served(server: Server) -> None:
    page = httpx.get(f"{server.url}/", timeout=60)
    assert page.headers["content-type"].startswith("text/html")
    assert 'id="generate"' in page.text and "/playground.js" in page.text
    assert "://" not in page.text  # nothing from another site: it works offline
    script = httpx.get(f"{server.url}/playground.js", timeout=60)
    assert "AbortController" in script.text and "getReader" in script.text
    assert httpx.get(f"{server.url}/playground.css", timeout=60).status_code == 200


# ---- a full server, clients that leave, a server that stops ---------------------------------


@pytest.mark.slow
def test_full_server_answers_429(one_slot: Server) -> None:
    body = {"model": "tiny", "prompt": ROMEO, "max_tokens": 1_000_000, "stream": True}
    with httpx.stream(
        "POST", f"{one_slot.api}/completions", json=body, timeout=REQUEST_TIMEOUT
    ) as response:
        lines = response.iter_lines()  # kept: a dropped iterator closes the response
        next(lines)  # the long request is running
        busy = one_slot.post({"model": "tiny", "prompt": ROMEO, "max_tokens": 5})
        assert busy.status_code == 429
        assert busy.json()["error"]["code"] == "server_full"
        with pytest.raises(openai.RateLimitError):
            one_slot.client().completions.create(model="tiny", prompt=ROMEO, max_tokens=5)
    wait_idle(one_slot)  # closing the stream cancelled its sequence
    assert one_slot.post({"model": "tiny", "prompt": ROMEO, "max_tokens": 5}).status_code == 200


@pytest.mark.slow
def test_a_client_that_leaves_cancels_its_sequence(one_slot: Server) -> None:
    body = {"model": "tiny", "prompt": ROMEO, "max_tokens": 1_000_000}
    with pytest.raises(httpx.ReadTimeout):
        one_slot.post(body, timeout=httpx.Timeout(REQUEST_TIMEOUT, read=1.0))
    wait_idle(one_slot)
    assert one_slot.post({"model": "tiny", "prompt": ROMEO, "max_tokens": 5}).status_code == 200


@pytest.mark.slow
def test_skipped_unknown_characters(one_slot: Server, model: charlstm.CharLM) -> None:
    body = {"model": "tiny", "prompt": "RO☃MEO:", "max_tokens": 30, "seed": 4, "echo": True}
    text = one_slot.post(body).json()["choices"][0]["text"]
    assert text == "RO☃MEO:" + model.generate(ROMEO, 30, seed=4)


def wait_idle(server: Server, timeout: float = 10.0) -> None:
    """Until the server runs no sequence (within ``timeout``: a cancel takes effect at once)."""
    deadline = time.monotonic() + timeout
    while server.health()["running"]:
        assert time.monotonic() < deadline, "a sequence kept running after its client left"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_drains_then_exits_143(trained_run: Path, session_data_dir: Path) -> None:
    server = Server(
        trained_run, session_data_dir, "--max-tokens", "1000000", "--drain-timeout", "1"
    ).wait_ready()
    try:
        body = {"model": "tiny", "prompt": ROMEO, "max_tokens": 1_000_000, "stream": True}
        with httpx.stream(
            "POST", f"{server.api}/completions", json=body, timeout=REQUEST_TIMEOUT
        ) as response:
            lines = response.iter_lines()
            next(lines)
            server.process.send_signal(signal.SIGTERM)
            assert refused_while_draining(server)
            events = [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
                      for line in lines if line.startswith("data: ")]  # fmt: skip
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] in ("abort", "length")
        assert server.process.wait(timeout=60) == 143
    finally:
        server.stop()
    assert "Traceback" not in server.stderr(), server.stderr()


def refused_while_draining(server: Server, timeout: float = 10.0) -> bool:
    """Whether new requests get 503 once the signal has landed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = server.post({"model": "tiny", "prompt": ROMEO, "max_tokens": 5})
        if response.status_code == 503:
            return response.json()["error"]["code"] == "shutting_down"
        time.sleep(0.05)
    return False


# ---- many clients at once -------------------------------------------------------------------


def identity_requests(count: int) -> list[dict[str, Any]]:
    """``count`` requests with settings all different from each other."""
    prompts = [ROMEO, "JULIET:", "\n", "First Citizen:\nBefore we proceed", "O", "KING RICHARD"]
    return [
        {
            "model": "tiny",
            "prompt": prompts[i % len(prompts)],
            "max_tokens": 40 + 3 * i,
            "temperature": (0.0, 0.5, 0.8, 1.2)[i % 4],
            "top_k": (0, 5)[i % 2],
            "top_p": (1.0, 0.9, 0.5)[i % 3],
            "seed": 1000 + i,
        }
        for i in range(count)
    ]


@pytest.mark.slow
@pytest.mark.slow
def test_64_concurrent_streams_each_get_their_alone_output(
    server: Server, model: charlstm.CharLM
) -> None:
    requests = identity_requests(64)
    alone = [server.post(body).json()["choices"][0]["text"] for body in requests]
    for body, text in zip(requests, alone, strict=True):  # alone: what the model itself gives
        settings = {k: body[k] for k in ("temperature", "top_k", "top_p", "seed")}
        assert text == model.generate(body["prompt"], body["max_tokens"], **settings)

    async def one(client: httpx.AsyncClient, body: dict[str, Any]) -> str:
        parts = []
        async with client.stream(
            "POST", f"{server.api}/completions", json={**body, "stream": True}
        ) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    parts.extend(c["text"] for c in json.loads(line[6:])["choices"])
        return "".join(parts)

    async def all_at_once() -> list[str]:
        limits = httpx.Limits(max_connections=len(requests))
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT, limits=limits) as client:
            return await asyncio.gather(*(one(client, body) for body in requests))

    together = asyncio.run(all_at_once())
    for index, (mine, expected) in enumerate(zip(together, alone, strict=True)):
        assert mine == expected, f"client {index} got other characters beside 63 others"


# ---- the command ----------------------------------------------------------------------------


@pytest.mark.slow
def test_limits_defaults_match_the_command() -> None:
    from charlstm.cli import SERVE_DEFAULTS
    from charlstm.server import ServeLimits

    limits = ServeLimits()
    assert {name: getattr(limits, name) for name in SERVE_DEFAULTS} == SERVE_DEFAULTS


BAD_FLAGS = [
    (["--max-tokens", "0"], ["--max-tokens", "at least 1"]),
    (["--max-prompt", "-5"], ["--max-prompt"]),
    (["--max-n", "0"], ["--max-n"]),
    (["--max-sequences", "0"], ["--max-sequences"]),
    (["--drain-timeout", "-1"], ["--drain-timeout"]),
    (["--drain-timeout", "inf"], ["--drain-timeout"]),
    (["--port", "70000"], ["--port"]),
    (["--unknown", "ignore"], ["--unknown"]),
]
# Runs `charlstm ARGS` in this process, then says whether torch had loaded.
WITHOUT_TORCH = """
import sys
from charlstm.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("torch loaded:", "torch" in sys.modules, file=sys.stderr)
"""


@pytest.mark.parametrize(("flags", "words"), BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_before_torch_loads(
    trained_run: Path, session_data_dir: Path, tmp_path: Path, flags: list[str], words: list[str]
) -> None:
    result = run_cli(["serve", trained_run, *flags], session_data_dir, tmp_path)
    refused(result, *words)
    check = run_cli(["serve", trained_run, *flags], session_data_dir, tmp_path,
                    python=WITHOUT_TORCH)  # fmt: skip
    assert check.stderr.splitlines()[-1] == "torch loaded: False"


@pytest.mark.slow
def test_missing_checkpoint_is_one_line(session_data_dir: Path, tmp_path: Path) -> None:
    result = run_cli(["serve", tmp_path / "nothing", "--port", "0"], session_data_dir, tmp_path)
    refused(result, "does not exist")


@pytest.mark.slow
def test_a_taken_port_is_one_line(
    trained_run: Path, session_data_dir: Path, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(["serve", trained_run, "--port", port], session_data_dir, tmp_path)
    refused(result, "cannot listen", str(port))
