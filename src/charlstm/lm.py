"""CharLM: a trained network with its vocabulary, ready to sample from and evaluate."""

from __future__ import annotations

import codecs
import dataclasses
import math
import numbers
import re
import typing
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from charlstm.checkpoint import read_checkpoint, run_directory_of
from charlstm.config import DEFAULT_PROMPT, DynamicEvalConfig, RunConfig, SampleConfig
from charlstm.data import (
    BYTES,
    Sources,
    Vocab,
    available_memory,
    iter_symbols,
    kept_stdin,
    load_corpus,
    resolve_sources,
)
from charlstm.device import resolve_device
from charlstm.errors import CharLSTMError
from charlstm.evaluation import EvalResult, Progress, dynamic_evaluate_ids, evaluate_ids
from charlstm.model import CharRNN
from charlstm.sample import fresh_seed, generate_ids

# The defaults of the sampling methods' parameters: SampleConfig's own, so that signatures and
# help() show the real values and there is no second list of them to fall out of step.
_DEFAULT = SampleConfig()


class CharLM:
    """What :func:`charlstm.load` returns: the network, its vocabulary and its configuration."""

    def __init__(
        self,
        net: CharRNN,
        vocab: Vocab,
        config: RunConfig,
        info: dict[str, Any] | None = None,
        path: Path | None = None,
    ) -> None:
        self.net = net
        self.vocab = vocab
        self.config = config
        self.info = info or {}
        self.path = path  # the checkpoint directory it was loaded from, if any

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> CharLM:
        """Load a checkpoint directory (or a run directory: its best/, else last/)."""
        checkpoint = read_checkpoint(path)
        try:
            net = CharRNN(checkpoint.config.model, checkpoint.vocab.size)
            net.load_state_dict(checkpoint.weights, strict=True)
        except (RuntimeError, CharLSTMError) as e:
            raise CharLSTMError(
                f"{checkpoint.path}: the weights do not match the configuration and vocabulary "
                f"in config.json ({_first_detail(e)})"
            ) from None
        net.to(resolve_device(device)).eval()
        return cls(net, checkpoint.vocab, checkpoint.config, checkpoint.info, checkpoint.path)

    @property
    def device(self) -> torch.device:
        """Where the network's weights live."""
        return next(self.net.parameters()).device

    def stream(
        self,
        prompt: str = _DEFAULT.prompt,
        length: int = _DEFAULT.length,
        *,
        temperature: float = _DEFAULT.temperature,
        top_k: int = _DEFAULT.top_k,
        top_p: float = _DEFAULT.top_p,
        seed: int | None = _DEFAULT.seed,
        unknown: str = _DEFAULT.unknown,
    ) -> Iterator[str]:
        """Yield ``length`` pieces of text continuing ``prompt`` (one character each, for text
        models); the prompt itself is not repeated. Every setting is checked before this returns.

        ``temperature`` scales the logits (0 is greedy: always the likeliest character);
        ``top_k`` samples from the k likeliest only (0 = off); ``top_p`` from the smallest set
        whose probability reaches it (1 = off); ``seed`` makes the draw repeatable (None: fresh
        randomness); ``unknown`` says what prompt characters outside the vocabulary do:
        ``"error"``, ``"skip"`` or ``"replace"``. The defaults are
        :class:`~charlstm.config.SampleConfig`'s, those of ``charlstm sample``.
        """
        config = _sample_config(prompt, length, 1, temperature, top_k, top_p, seed, unknown)
        return (column[0] for column in self._columns(config))

    def generate(
        self,
        prompt: str = _DEFAULT.prompt,
        length: int = _DEFAULT.length,
        *,
        temperature: float = _DEFAULT.temperature,
        top_k: int = _DEFAULT.top_k,
        top_p: float = _DEFAULT.top_p,
        seed: int | None = _DEFAULT.seed,
        unknown: str = _DEFAULT.unknown,
    ) -> str:
        """Generate ``length`` characters continuing ``prompt``; the settings are
        :meth:`stream`'s."""
        config = _sample_config(prompt, length, 1, temperature, top_k, top_p, seed, unknown)
        return "".join(column[0] for column in self._columns(config))

    def generate_batch(
        self,
        num_samples: int,
        prompt: str = _DEFAULT.prompt,
        length: int = _DEFAULT.length,
        *,
        temperature: float = _DEFAULT.temperature,
        top_k: int = _DEFAULT.top_k,
        top_p: float = _DEFAULT.top_p,
        seed: int | None = _DEFAULT.seed,
        unknown: str = _DEFAULT.unknown,
    ) -> list[str]:
        """``num_samples`` independent continuations of ``prompt``, generated as one batch;
        the settings are :meth:`stream`'s. Each sample draws from its own generator, seeded
        from ``seed`` and its index, so sample i is the same whatever the number of samples
        (the first is :meth:`generate`'s with the same seed)."""
        config = _sample_config(
            prompt, length, num_samples, temperature, top_k, top_p, seed, unknown
        )
        columns = self._columns(config)  # checks come first
        pieces: list[list[str]] = [[] for _ in range(num_samples)]
        for column in columns:
            for piece, text in zip(pieces, column, strict=True):
                piece.append(text)
        return ["".join(p) for p in pieces]

    def samples(
        self,
        prompt: str = _DEFAULT.prompt,
        length: int = _DEFAULT.length,
        *,
        num_samples: int = _DEFAULT.num_samples,
        temperature: float = _DEFAULT.temperature,
        top_k: int = _DEFAULT.top_k,
        top_p: float = _DEFAULT.top_p,
        seed: int | None = _DEFAULT.seed,
        unknown: str = _DEFAULT.unknown,
    ) -> list[Sample]:
        """:meth:`generate_batch`'s samples, each with the settings and seed that reproduce it:
        with no ``seed`` one is drawn, and every sample reports it (what ``charlstm sample
        --json`` prints)."""
        config = _sample_config(
            prompt, length, num_samples, temperature, top_k, top_p, seed, unknown
        )
        config.seed = fresh_seed() if seed is None else seed
        texts = self.generate_batch(
            num_samples, prompt, length, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=config.seed, unknown=unknown,
        )  # fmt: skip
        return [Sample(text, index, config) for index, text in enumerate(texts)]

    def summary(self) -> dict[str, Any]:
        """The model in JSON-ready facts: its name (its run directory's) and checkpoint path
        (None for a model not loaded from one), shape, size, vocabulary, the corpus it learnt,
        its training step and validation bits per character (None where not recorded)."""
        mc, corpus, val = self.config.model, self.info.get("corpus"), self.info.get("val")
        bpc = val.get("bpc") if isinstance(val, dict) else None
        step = self.info.get("step")
        return {
            "name": run_directory_of(self.path).name if self.path is not None else None,
            "path": str(self.path) if self.path is not None else None,
            "cell": mc.cell,
            "layers": mc.n_layers,
            "hidden": mc.hidden_dim,
            "embed": mc.embed_dim,
            "parameters": self.net.num_parameters(),
            "vocabulary": self.vocab.size,
            "corpus": corpus.get("name") if isinstance(corpus, dict) else None,
            "step": step if isinstance(step, int) else None,
            "val_bpc": bpc if _is_finite_number(bpc) else None,
        }

    def __repr__(self) -> str:
        """One line: the network's shape and size, its vocabulary, corpus, device and, if the
        checkpoint was evaluated, its validation bits per character."""
        facts = self.summary()
        parts = [
            f"{facts['cell']} {facts['layers']}x{facts['hidden']}",
            f"{facts['parameters']:,} parameters",
            f"vocabulary {facts['vocabulary']}",
        ]
        if facts["corpus"]:
            parts.append(f"corpus {facts['corpus']}")
        parts.append(str(self.device))
        if facts["val_bpc"] is not None:
            parts.append(f"val {facts['val_bpc']:.3f} bpc")
        return f"<CharLM {', '.join(parts)}>"

    def evaluate(
        self, text: str, unknown: str = "error", dynamic: bool | DynamicEvalConfig = False
    ) -> EvalResult:
        """Loss, bits and perplexity per character of ``text`` under this model.

        With ``dynamic`` (True, or a :class:`~charlstm.config.DynamicEvalConfig`), the model
        adapts to the text as it scores it (dynamic evaluation); this model is not changed.
        """
        ids = self.vocab.encode(text, unknown=unknown, what="the text")
        return self._evaluate_blocks([ids], dynamic)

    def evaluate_files(
        self,
        paths: list[str],
        encoding: str | None = None,
        unknown: str = "error",
        dynamic: bool | DynamicEvalConfig = False,
        progress: Progress | None = None,
    ) -> EvalResult:
        """Like :meth:`evaluate` over files, read in blocks so any size fits in memory.

        ``-`` among ``paths`` reads standard input. ``encoding`` defaults to the one the model
        was trained with (``--encoding`` of its run). ``progress``, if given, is called with
        each number of characters scored.
        """
        sources = self._sources(paths, encoding)
        blocks = (
            self.vocab.encode_codepoints(block, unknown=unknown, what=sources.name)
            for block in iter_symbols(sources)
        )
        return self._evaluate_blocks(blocks, dynamic, progress)

    def evaluate_validation(
        self, dynamic: bool | DynamicEvalConfig = False, progress: Progress | None = None
    ) -> EvalResult:
        """Like :meth:`evaluate_files` on the validation split of the text this model was
        trained on, read again from the files its configuration names (in its encoding), or for
        text that came from standard input, from the copy kept of it. Refused if that text is
        no longer the one the model was trained on: its split would be other text."""
        data = self.config.data
        fingerprint = self.info.get("corpus", {}).get("fingerprint")
        corpus = load_corpus(data, vocab=self.vocab, stdin=kept_stdin(data, fingerprint))
        if fingerprint and corpus.fingerprint != fingerprint:
            raise CharLSTMError(
                f"the training text ({' '.join(data.data + data.val_data)}) changed since the "
                "model was trained on it, so its validation split is other text now"
            )
        return self._evaluate_blocks([corpus.val], dynamic, progress)

    def _evaluate_blocks(
        self,
        blocks: Iterable[np.ndarray],
        dynamic: bool | DynamicEvalConfig,
        progress: Progress | None = None,
    ) -> EvalResult:
        if dynamic is False:
            return evaluate_ids(self.net, blocks, progress=progress)
        settings = DynamicEvalConfig() if dynamic is True else dynamic
        if not isinstance(settings, DynamicEvalConfig):
            raise CharLSTMError(
                f"dynamic= takes True, False or a DynamicEvalConfig, not {dynamic!r}"
            )
        return dynamic_evaluate_ids(self.net, blocks, settings, progress=progress)

    def _sources(self, paths: list[str], encoding: str | None) -> Sources:
        model_bytes = self.vocab.kind == BYTES
        # A byte model of a built-in corpus has "utf-8" in its configuration: the corpus says bytes.
        encoding = encoding or (BYTES if model_bytes else self.config.data.encoding)
        if (encoding == BYTES) != model_bytes:
            kind = "raw bytes" if model_bytes else "text"
            raise CharLSTMError(f"this model reads {kind}; --encoding {encoding} does not fit it")
        return resolve_sources(paths, encoding)

    def _columns(self, config: SampleConfig) -> Iterator[list[str]]:
        """Per step, the next piece of text of each sample; everything is checked at once."""
        prompt, length, num_samples = config.prompt, config.length, config.num_samples
        # The default newline starts a model whose text had none from its stand-in for one.
        unknown = "replace" if prompt == DEFAULT_PROMPT else config.unknown
        prompt_ids = self.vocab.encode(prompt, unknown=unknown, what="prompt")
        if len(prompt_ids) == 0:
            raise CharLSTMError("the prompt is empty; give at least one character (default: \\n)")
        self._check_sampling_memory(num_samples, length)
        if self.vocab.kind == BYTES:  # each sample's decoder holds its unfinished character
            decoders = [piece_decoder(self.vocab) for _ in range(num_samples)]
        else:
            decoders = [piece_decoder(self.vocab)] * num_samples  # stateless: one serves all
        steps = generate_ids(
            self.net,
            torch.from_numpy(prompt_ids.astype(np.int64)),
            length,
            num_samples=num_samples,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            seed=config.seed,
        )
        return (
            [
                decode(i, step == length - 1)
                for decode, i in zip(decoders, ids.tolist(), strict=True)
            ]
            for step, ids in enumerate(steps)
        )

    def _check_sampling_memory(self, num_samples: int, length: int) -> None:
        """Refuse a batch of samples that cannot fit in memory before allocating any of it
        (its state and logits, and, for several samples, the text kept until the end)."""
        mc = self.config.model
        state = mc.n_layers * mc.hidden_dim * (2 if mc.cell == "lstm" else 1)
        # fp32 states (torch's and numpy's), fp32 logits, two fp64 rows of probabilities, and
        # the sample's own random generator (about 1.6 kB measured).
        per_sample = 8 * state + 20 * self.vocab.size + 2048
        if num_samples > 1:
            per_sample += 8 * length  # generate_batch keeps a reference per character
        needed, available = num_samples * per_sample, available_memory()
        if available is not None and needed > available:
            raise CharLSTMError(
                f"{num_samples:,} samples of {length:,} characters need at least "
                f"{needed / 1e9:,.1f} GB of memory and {available / 1e9:,.1f} GB is available: "
                "use a smaller --num-samples or --length"
            )


@dataclasses.dataclass(frozen=True)
class Sample:
    """One sample of :meth:`CharLM.samples`: its text (the continuation alone), its place
    among the samples of its call, and the settings that drew it, the seed included (sample
    ``index`` of seed ``s`` is ``generate_batch(index + 1, ..., seed=s)[index]``)."""

    text: str
    index: int
    settings: SampleConfig

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: prompt, text, settings, seed and index (numbers as Python's own,
        whatever numpy types the call was given)."""
        s = self.settings
        return {
            "prompt": s.prompt,
            "text": self.text,
            "settings": {"length": int(s.length), "temperature": float(s.temperature),
                         "top_k": int(s.top_k), "top_p": float(s.top_p), "unknown": s.unknown},
            "seed": int(s.seed) if s.seed is not None else None,
            "index": self.index,
        }  # fmt: skip


def _is_finite_number(value: Any) -> bool:
    """A number JSON can hold (a bool is no number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_SETTINGS = {f.name for f in dataclasses.fields(SampleConfig)}
_SETTING_TYPES = typing.get_type_hints(SampleConfig)
# Numbers as Python and numpy spell them; a bool is no number here (True is not a top_k).
_KINDS: dict[Any, type | tuple[type, ...]] = {
    int: numbers.Integral,
    float: numbers.Real,
    str: str,
    type(None): type(None),
}
_FLAG = re.compile(r"--([a-z0-9]+(?:-[a-z0-9]+)*)")


def _sample_config(
    prompt: str,
    length: int,
    num_samples: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    unknown: str,
) -> SampleConfig:
    """The settings of one call, checked, with errors that name the Python parameters.

    :meth:`SampleConfig.validate` words its messages for the command line (``--top-p must
    be ...``); the CLI validates with it before calling here, so this wording is the API's.
    """
    config = SampleConfig(
        prompt=prompt,
        length=length,
        num_samples=num_samples,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        unknown=unknown,
    )
    for name, hint in _SETTING_TYPES.items():
        value = getattr(config, name)
        kinds = typing.get_args(hint) or (hint,)  # int | None: (int, NoneType)
        if isinstance(value, bool) or not any(isinstance(value, _KINDS[k]) for k in kinds):
            expected = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
            raise TypeError(f"{name} must be {expected}, not {type(value).__name__} {value!r}")
    try:
        config.validate()
    except CharLSTMError as e:
        raise CharLSTMError(_FLAG.sub(_parameter_name, str(e))) from None
    return config


def _parameter_name(flag: re.Match[str]) -> str:
    """``top_p`` for the flag ``--top-p`` of a sampling setting; other flags stay as they are."""
    name = flag.group(1).replace("-", "_")
    return name if name in _SETTINGS else flag.group(0)


def _first_detail(error: Exception) -> str:
    """The first informative line of an error: load_state_dict's header line says nothing."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[1:] or lines or [type(error).__name__])[0]


def piece_decoder(vocab: Vocab) -> Callable[[int, bool], str]:
    """A function from one id (and whether it is the last) to its text: a character, or for
    byte models whatever UTF-8 characters that byte completes (an incremental decoder, so
    multi-byte characters survive; on the last id an unfinished one becomes U+FFFD, as in
    :meth:`Vocab.decode`)."""
    symbols = vocab.codepoints
    if vocab.kind != BYTES:
        return lambda i, final: chr(symbols[i])
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return lambda i, final: decoder.decode(bytes([symbols[i]]), final=final)
