"""CharLM: a trained network with its vocabulary, ready to sample from and evaluate."""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from charlstm.checkpoint import read_checkpoint
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
from charlstm.evaluate import EvalResult, Progress, dynamic_evaluate_ids, evaluate_ids
from charlstm.model import CharRNN
from charlstm.sample import generate_ids


class CharLM:
    """What :func:`charlstm.load` returns: the network, its vocabulary and its configuration."""

    def __init__(
        self, net: CharRNN, vocab: Vocab, config: RunConfig, info: dict[str, Any] | None = None
    ) -> None:
        self.net = net
        self.vocab = vocab
        self.config = config
        self.info = info or {}

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
        return cls(net, checkpoint.vocab, checkpoint.config, checkpoint.info)

    @property
    def device(self) -> torch.device:
        """Where the network's weights live."""
        return next(self.net.parameters()).device

    def stream(self, prompt: str = "\n", length: int = 500, **settings: Any) -> Iterator[str]:
        """Yield generated text piece by piece (one character each, for text models).

        Settings are those of :class:`~charlstm.config.SampleConfig`: temperature, top_k,
        top_p, seed, unknown. The prompt itself is not repeated in the output.
        """
        columns = self._columns(prompt, length, 1, **settings)
        return (column[0] for column in columns)

    def generate(self, prompt: str = "\n", length: int = 500, **settings: Any) -> str:
        """Generate ``length`` characters continuing ``prompt``; see :meth:`stream`."""
        return "".join(self.stream(prompt, length, **settings))

    def generate_batch(
        self, num_samples: int, prompt: str = "\n", length: int = 500, **settings: Any
    ) -> list[str]:
        """``num_samples`` independent continuations of ``prompt``, generated as one batch."""
        columns = self._columns(prompt, length, num_samples, **settings)  # checks come first
        pieces: list[list[str]] = [[] for _ in range(num_samples)]
        for column in columns:
            for piece, text in zip(pieces, column, strict=True):
                piece.append(text)
        return ["".join(p) for p in pieces]

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

    def _columns(
        self, prompt: str, length: int, num_samples: int, **settings: Any
    ) -> Iterator[list[str]]:
        """Per step, the next piece of text of each sample; settings are checked at once."""
        config = SampleConfig(prompt=prompt, length=length, num_samples=num_samples, **settings)
        config.validate()
        # The default newline starts a model whose text had none from its stand-in for one.
        unknown = "replace" if prompt == DEFAULT_PROMPT else config.unknown
        prompt_ids = self.vocab.encode(prompt, unknown=unknown, what="prompt")
        if len(prompt_ids) == 0:
            raise CharLSTMError("the prompt is empty; give at least one character (default: \\n)")
        self._check_sampling_memory(num_samples, length)
        if self.vocab.kind == BYTES:  # each sample's decoder holds its unfinished character
            decoders = [_piece_decoder(self.vocab) for _ in range(num_samples)]
        else:
            decoders = [_piece_decoder(self.vocab)] * num_samples  # stateless: one serves all
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
        # fp32 states (torch's and numpy's), fp32 logits and two fp64 rows of probabilities.
        per_sample = 8 * state + 20 * self.vocab.size
        if num_samples > 1:
            per_sample += 8 * length  # generate_batch keeps a reference per character
        needed, available = num_samples * per_sample, available_memory()
        if available is not None and needed > available:
            raise CharLSTMError(
                f"{num_samples:,} samples of {length:,} characters need at least "
                f"{needed / 1e9:,.1f} GB of memory and {available / 1e9:,.1f} GB is available: "
                "use a smaller --num-samples or --length"
            )


def _first_detail(error: Exception) -> str:
    """The first informative line of an error: load_state_dict's header line says nothing."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[1:] or lines or [type(error).__name__])[0]


def _piece_decoder(vocab: Vocab):
    """A function from one id (and whether it is the last) to its text: a character, or for
    byte models whatever UTF-8 characters that byte completes (an incremental decoder, so
    multi-byte characters survive; on the last id an unfinished one becomes U+FFFD, as in
    :meth:`Vocab.decode`)."""
    symbols = vocab.codepoints
    if vocab.kind != BYTES:
        return lambda i, final: chr(symbols[i])
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return lambda i, final: decoder.decode(bytes([symbols[i]]), final=final)
