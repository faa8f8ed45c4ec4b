"""Interpretable cells, after Karpathy, Johnson and Fei-Fei, "Visualizing and Understanding
Recurrent Networks" (2015): record every unit's activation over a text, score each unit
against simple properties of that text, and colour the text by the best units.

A unit is named ``<kind><layer>:<index>``: ``h2:17`` is unit 17 of layer 2's hidden state,
``c1:5`` unit 5 of layer 1's LSTM cell state (layers from 1, units from 0). The activation at
position t is the state right after reading character t, so every property below describes
what has been read up to and including character t.

Property scorers are pure functions from a string to one float per character, NaN where the
property does not apply (vowel vs consonant says nothing of a space); correlations skip those.
"""

from __future__ import annotations

import html
import os
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from charlstm.config import INSPECT_MAX_CHARS, ModelConfig
from charlstm.data import BYTES, available_memory
from charlstm.errors import CharLSTMError
from charlstm.lm import CharLM
from charlstm.model import WEIGHT_NAMES, CharRNN, reference_lstm_layer, run_layer

MIN_CHARS = 100  # fewer characters than this make correlations meaningless
_VOWELS = frozenset("aeiou")

# ---- properties of the text -----------------------------------------------------------------


def _codes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)


def in_quotes(text: str) -> np.ndarray:
    """1 inside double quotes (from the opening ``"`` up to, not including, the closing one)."""
    return (np.cumsum(_codes(text) == ord('"')) % 2).astype(np.float64)


def in_parentheses(text: str) -> np.ndarray:
    """1 inside parentheses, nested or not (from ``(`` up to, not including, its ``)``)."""
    out, depth = np.zeros(len(text)), 0
    for t, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(depth - 1, 0)  # a stray ")" closes nothing
        out[t] = depth > 0
    return out


def line_position(text: str) -> np.ndarray:
    """Characters of the current line read so far: 1, 2, 3, ... and 0 right after a newline."""
    codes = _codes(text)
    index = np.arange(len(codes))
    last_newline = np.maximum.accumulate(np.where(codes == 10, index, -1)) if len(codes) else index
    return (index - last_newline).astype(np.float64)


def speaker_name(text: str) -> np.ndarray:
    """1 on the characters of a line that ends with ':' (a speaker's name in a play), colon
    included, newline not."""
    out = np.zeros(len(text))
    start = 0
    for line in text.split("\n"):
        if line.rstrip().endswith(":"):
            out[start : start + len(line)] = 1.0
        start += len(line) + 1
    return out


def after_newline(text: str) -> np.ndarray:
    """1 on each newline: the state from which the first character of a line is predicted."""
    return (_codes(text) == 10).astype(np.float64)


def vowel(text: str) -> np.ndarray:
    """1 on vowels (a, e, i, o, u, accented or not), 0 on other letters, NaN on non-letters."""
    out = np.full(len(text), np.nan)
    for t, ch in enumerate(text):
        if ch.isalpha():
            out[t] = unicodedata.normalize("NFD", ch)[0].lower() in _VOWELS
    return out


@dataclass(frozen=True)
class Property:
    """A named property of a text, computed per character."""

    name: str
    description: str
    score: Callable[[str], np.ndarray]


PROPERTIES: tuple[Property, ...] = (
    Property("quotes", "inside double quotes", in_quotes),
    Property("parentheses", "inside parentheses", in_parentheses),
    Property("line position", "characters since the last newline", line_position),
    Property("speaker", "in a speaker name (a line ending with ':')", speaker_name),
    Property("newline", "just read a newline", after_newline),
    Property("vowel", "a vowel (1) or another letter (0)", vowel),
)


def correlate(activations: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column of ``activations`` (T, U) with ``values`` (T,).

    Positions where ``values`` is NaN are left out; a unit or property that is constant over
    the rest has correlation 0 (it tells nothing apart).
    """
    keep = np.isfinite(values)
    a = activations[keep].astype(np.float64)
    v = values[keep].astype(np.float64)
    r = np.zeros(activations.shape[1])
    if len(v) < 2:
        return r
    a -= a.mean(axis=0)
    v = v - v.mean()
    scale = np.sqrt((a * a).sum(axis=0) * (v @ v))
    np.divide(a.T @ v, scale, out=r, where=scale > 1e-12)
    return np.clip(r, -1.0, 1.0)


# ---- activations ----------------------------------------------------------------------------


@torch.no_grad()
def record_activations(net: CharRNN, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Every layer's state after each id: ``{"h1": (T, H), "c1": (T, H), "h2": ...}``.

    nn.LSTM returns the cell state of the last step only, so LSTM layers run through
    :func:`~charlstm.model.reference_lstm_layer`, which returns every step's; GRU and RNN
    layers, whose state is their output, through :func:`~charlstm.model.run_layer`.
    The network runs as in evaluation: no dropout.
    """
    config, rnn = net.config, net.rnn
    device = net.head.weight.device
    x = net.embed(torch.as_tensor(np.asarray(ids, dtype=np.int64), device=device)).float()
    series: dict[str, np.ndarray] = {}
    for layer in range(config.n_layers):
        weights = [getattr(rnn, f"{name}_l{layer}").float() for name in WEIGHT_NAMES]
        zeros = x.new_zeros(1, rnn.hidden_size)  # one stream, from a zero state
        if config.cell == "lstm":
            hs, cs = reference_lstm_layer(x[None], (zeros, zeros), weights)
            h = hs[0]
            series[f"h{layer + 1}"], series[f"c{layer + 1}"] = h.cpu().numpy(), cs[0].cpu().numpy()
        else:
            out, _ = run_layer(config.cell, x[None], (zeros,), weights)
            h = out[0]
            series[f"h{layer + 1}"] = h.cpu().numpy()
        x = h  # the next layer reads this one's hidden state
    return series


# ---- the inspection -------------------------------------------------------------------------


@dataclass
class Inspection:
    """A model's activations over a text, the text's properties and their correlations."""

    text: str
    model_name: str
    activations: dict[str, np.ndarray]  # "h1" -> (T, hidden), in layer order
    properties: dict[str, np.ndarray]  # property name -> (T,), NaN where it does not apply
    correlations: dict[str, np.ndarray]  # property name -> (units,), in unit_names order

    @property
    def unit_names(self) -> list[str]:
        """Every unit's name, series by series: h1:0, h1:1, ..., c1:0, ..."""
        return [f"{k}:{i}" for k, a in self.activations.items() for i in range(a.shape[1])]

    def unit(self, name: str) -> np.ndarray:
        """The activation of unit ``name`` (such as ``c2:17``) after each character."""
        kind, _, index = name.partition(":")
        series = self.activations.get(kind)
        if series is None or not index.isdigit() or int(index) >= series.shape[1]:
            first, size = next(iter(self.activations)), next(iter(self.activations.values()))
            raise CharLSTMError(
                f"no unit {name!r} in this model; units are named like {first}:0 .. "
                f"{first}:{size.shape[1] - 1} (series {', '.join(self.activations)})"
            )
        return series[:, int(index)]

    def varies(self, prop: str) -> bool:
        """Whether property ``prop`` takes more than one value over this text."""
        values = self.properties[prop]
        values = values[np.isfinite(values)]
        return len(values) > 1 and float(values.max()) > float(values.min())

    def top(self, prop: str, k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` units most correlated (either sign) with property ``prop``, with r."""
        if prop not in self.correlations:
            raise CharLSTMError(f"no property {prop!r}; properties: {', '.join(self.correlations)}")
        if not self.varies(prop):
            return []
        r, names = self.correlations[prop], self.unit_names
        order = np.argsort(-np.abs(r), kind="stable")[:k]
        return [(names[i], float(r[i])) for i in order]

    def report(self, k: int = 3) -> str:
        """The top ``k`` units per property as a plain-text table."""
        sizes = {kind: a.shape[1] for kind, a in self.activations.items()}
        lines = [
            f"{len(self.text):,} characters through {self.model_name}: "
            + ", ".join(f"{kind} ({n} units)" for kind, n in sizes.items()),
            f"{'property':<52} {'unit':>8} {'r':>7}",
        ]
        for p in PROPERTIES:
            label = f"{p.name}: {p.description}"
            top = self.top(p.name, k)
            if not top:
                lines.append(f"{label:<52} (constant in this text)")
            for rank, (unit, r) in enumerate(top):
                lines.append(f"{label if rank == 0 else '':<52} {unit:>8} {r:>+7.3f}")
        return "\n".join(lines)

    def rows(self, k: int = 3, units: Sequence[str] = ()) -> list[tuple[str, str, float | None]]:
        """(heading, unit, r) for each row the pictures show: chosen units first, then the top
        ``k`` of each property that varies."""
        for unit in units:
            self.unit(unit)  # an unknown name is refused here, with the names that exist
        chosen = [(f"chosen unit {u}", u, None) for u in units]
        ranked = [
            (f"{p.name}: {p.description}", unit, r)
            for p in PROPERTIES
            for unit, r in self.top(p.name, k)
        ]
        return chosen + ranked

    def write_html(
        self, path: str | Path, *, k: int = 3, units: Sequence[str] = (), show: int = 1_000
    ) -> Path:
        """A self-contained page: the first ``show`` characters coloured by each row's unit
        (red positive, blue negative, scaled per unit), its value on hover."""
        text = self.text[:show]
        sections, heading = [], None
        for title, unit, r in self.rows(k, units):
            if title != heading:
                sections.append(f"<h2>{html.escape(title)}</h2>")
                heading = title
            score = "" if r is None else f" <small>r = {r:+.3f}</small>"
            spans = _html_spans(text, self.unit(unit)[: len(text)])
            sections.append(
                f'<section><h3>{html.escape(unit)}{score}</h3><div class="text">{spans}</div>'
                "</section>"
            )
        page = _HTML_PAGE.format(
            title=html.escape(f"charlstm inspect: {self.model_name}"),
            summary=html.escape(
                f"{len(text):,} of {len(self.text):,} characters shown; red = positive, "
                "blue = negative, scaled to each unit's largest value here; hover for the value."
            ),
            style=_HTML_STYLE,
            sections="\n".join(sections),
        )
        return _write_text(Path(path), page)

    def write_png(
        self,
        path: str | Path,
        *,
        units: Sequence[str] = (),
        show: int = 600,
        width: int = 80,
        max_lines: int = 12,
    ) -> Path:
        """The best unit of each property (and any chosen ``units``) over the start of the
        text (at most ``show`` characters and ``max_lines`` lines of ``width``), as a PNG like
        the paper's figures."""
        from matplotlib.figure import Figure  # lazily: only pictures need matplotlib

        rows, seen = [], set()
        for title, unit, r in self.rows(1, units):
            if unit not in seen:
                seen.add(unit)
                rows.append((unit if r is None else f"{unit}   {title}   (r = {r:+.2f})", unit))
        cells = [cell for cell in _layout(self.text[:show], width) if cell[0] < max_lines]
        text = self.text[: len(cells)]
        height = cells[-1][0] + 1 if cells else 1
        panel = height + 1.6  # the text's lines and a caption above them
        count = max(len(rows), 1)
        # A cell of 0.105 x 0.2 inches fits a 10-point monospace character.
        figure = Figure(figsize=(0.105 * (width + 1) + 0.2, 0.2 * panel * count + 0.2))
        axes = figure.add_axes((0.01, 0.01, 0.98, 0.98))
        axes.set_xlim(-0.5, width + 0.5)
        axes.set_ylim(panel * count, -0.3)
        axes.axis("off")
        for number, (caption, unit) in enumerate(rows):
            top = number * panel
            axes.text(-0.5, top + 0.7, caption, fontsize=9, fontweight="bold", va="center")
            colours = _colours(self.unit(unit)[: len(text)])
            image = np.zeros((height, width + 1, 4))  # transparent where there is no text
            for row, col, t in cells:
                image[row, col] = colours[t]
            extent = (-0.5, width + 0.5, top + 1.3 + height, top + 1.3)
            axes.imshow(image, extent=extent, interpolation="nearest", aspect="auto")
            for row, col, t in cells:
                ch = "\u21b5" if text[t] == "\n" else text[t]
                if not ch.isspace():
                    axes.text(col, top + 1.8 + row, ch, **_GLYPH)
        return _save_figure(figure, Path(path))


def inspect(
    model: CharLM | str | Path,
    text: str,
    *,
    max_chars: int | None = INSPECT_MAX_CHARS,
    unknown: str = "error",
    device: str = "cpu",
) -> Inspection:
    """Run ``model`` (a CharLM, or a checkpoint or run directory) over ``text`` and correlate
    every unit with every property in :data:`PROPERTIES`.

    Only the first ``max_chars`` characters are used (None: all). ``unknown`` handles
    characters the model never saw: "error" lists them, "skip" drops them from the text,
    "replace" feeds the model a stand-in while the properties see the real character.
    """
    lm = model if isinstance(model, CharLM) else CharLM.load(model, device=device)
    name = str(model) if not isinstance(model, CharLM) else f"{lm.config.model.cell} model"
    if lm.vocab.kind == BYTES:
        raise CharLSTMError("inspect reads text, and this model reads raw bytes")
    if max_chars is not None:
        text = text[:max_chars]
    if unknown == "skip":
        known = set(lm.vocab.symbols())
        text = "".join(ch for ch in text if ch in known)
    if len(text) < MIN_CHARS:
        known = " the model knows" if unknown == "skip" else ""
        raise CharLSTMError(
            f"the text has {len(text)} characters{known}; inspecting needs at least {MIN_CHARS} "
            "for the correlations to mean anything"
        )
    _check_memory(len(text), lm.config.model)
    ids = lm.vocab.encode(text, unknown=unknown, what="the text")
    activations = record_activations(lm.net, ids)
    everything = np.concatenate(list(activations.values()), axis=1)
    properties = {p.name: p.score(text) for p in PROPERTIES}
    correlations = {name: correlate(everything, values) for name, values in properties.items()}
    mc = lm.config.model
    described = f"{name} ({mc.cell} {mc.n_layers}x{mc.hidden_dim})"
    return Inspection(text, described, activations, properties, correlations)


def _check_memory(chars: int, mc: ModelConfig) -> None:
    """Refuse a text too long to record in memory before recording any of it: every unit's
    activation at every character, in fp32, is held about twice, and once more in fp64 while
    it is correlated."""
    units = mc.n_layers * mc.hidden_dim * (2 if mc.cell == "lstm" else 1)
    needed, available = 16 * chars * units, available_memory()
    if available is not None and needed > available:
        raise CharLSTMError(
            f"inspecting {chars:,} characters of a model with {units:,} units needs about "
            f"{needed / 1e9:,.1f} GB of memory and {available / 1e9:,.1f} GB is available: use "
            "a smaller --max-chars"
        )


# ---- drawing --------------------------------------------------------------------------------

_GLYPH = {"fontsize": 10, "family": "monospace", "ha": "center", "va": "center", "color": "#222"}
_LEVELS = 8  # colour steps each side of zero: plenty for the eye, and short class names
_RED, _BLUE = np.array([0.84, 0.19, 0.15]), np.array([0.13, 0.40, 0.67])


def _scaled(values: np.ndarray) -> np.ndarray:
    """Values divided by their largest magnitude, so each unit uses the whole colour range."""
    peak = float(np.abs(values).max()) if len(values) else 0.0
    return values / peak if peak > 0 else np.zeros_like(values)


def _colours(values: np.ndarray) -> np.ndarray:
    """RGBA per value: white at zero, towards red (positive) or blue (negative)."""
    v = _scaled(values)[:, None]
    rgb = 1 - np.abs(v) * (1 - np.where(v >= 0, _RED, _BLUE))
    return np.concatenate([rgb, np.ones((len(v), 1))], axis=1)


def _level_css() -> str:
    rules = []
    for level in range(1, _LEVELS + 1):
        for sign, base in (("p", _RED), ("n", _BLUE)):
            rgb = 1 - level / _LEVELS * (1 - base)
            hex_colour = "".join(f"{round(255 * c):02x}" for c in rgb)
            rules.append(f".{sign}{level}{{background:#{hex_colour}}}")
    return "".join(rules)


def _html_spans(text: str, values: np.ndarray) -> str:
    levels = np.rint(_scaled(values) * _LEVELS).astype(int)
    spans = []
    for ch, value, level in zip(text, values.tolist(), levels.tolist(), strict=True):
        classes = [f"p{level}" if level > 0 else f"n{-level}"] if level else []
        if ch == "\n":
            classes.append("nl")  # shown as a return arrow by CSS; the text keeps its newline
        attribute = f' class="{" ".join(classes)}"' if classes else ""
        spans.append(f'<span{attribute} title="{value:.3f}">{html.escape(ch)}</span>')
    return "".join(spans)


def _layout(text: str, width: int) -> list[tuple[int, int, int]]:
    """(row, column, index) of each character on a grid ``width`` wide; a newline takes a cell
    at the end of its line, as the paper's figures show it."""
    cells, row, col = [], 0, 0
    for t, ch in enumerate(text):
        if col >= width:
            row, col = row + 1, 0
        cells.append((row, col, t))
        col += 1
        if ch == "\n":
            row, col = row + 1, 0
    return cells


def _write_text(path: Path, content: str) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    except OSError as e:
        raise CharLSTMError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def _save_figure(figure, path: Path) -> Path:
    temporary = path.with_name(f".tmp-{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(temporary, format="png", dpi=120)
        os.replace(temporary, path)
    except OSError as e:
        temporary.unlink(missing_ok=True)
        raise CharLSTMError(f"cannot write {path}: {e.strerror or e}") from None
    return path


_HTML_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:110ch}"
    "h2{font-size:1.1em;margin-top:2em;border-bottom:1px solid #ccc}"
    "h3{font-size:.95em;margin:1em 0 .3em;font-family:monospace}"
    "h3 small{font-weight:normal;color:#555}"
    ".text{font-family:ui-monospace,monospace;white-space:pre-wrap;line-height:1.45;"
    "border:1px solid #ddd;padding:.4em;word-break:break-all}"
    '.nl::before{content:"\\21b5";color:#888}'
    "span[title]:hover{outline:1px solid #000}" + _level_css()
)

_HTML_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<h1>{title}</h1>
<p>{summary}</p>
{sections}
</body>
</html>
"""
