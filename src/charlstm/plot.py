"""Loss curves: read runs' ``metrics.jsonl`` and draw bits per character against steps and time.

matplotlib is imported only when a picture is drawn (its import alone takes about half a
second), and only through its object-oriented API (``Figure``, rendered by the Agg canvas), so
drawing never touches pyplot's global state or the backend a caller's notebook has chosen.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from charlstm.errors import CharLSTMError
from charlstm.metrics_log import METRICS_FILE

CURVES_FILE = "curves.png"
_LN2 = math.log(2)


@dataclass(frozen=True)
class Curves:
    """One run's learning curves, in bits per character."""

    label: str
    train_step: np.ndarray
    train_seconds: np.ndarray
    train_bpc: np.ndarray
    val_step: np.ndarray
    val_seconds: np.ndarray
    val_bpc: np.ndarray


def read_curves(run_dir: str | Path, label: str | None = None) -> Curves:
    """The training and validation curves logged in ``run_dir/metrics.jsonl``.

    Training records hold the mean loss in nats since the previous one; it is converted to
    bits. A line cut short by a crash is skipped, as resuming does.
    """
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        what = "no such directory" if not run_dir.exists() else f"no {METRICS_FILE} in it"
        raise CharLSTMError(
            f"{run_dir} is not a run directory ({what}); give one that charlstm train wrote"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CharLSTMError(f"cannot read {path}: {e}") from None
    rows: dict[str, list[tuple[float, float, float]]] = {"train": [], "eval": []}
    for line in lines:
        try:
            record = json.loads(line)
            kind = record.get("kind")
            bpc = record["bpc"] if kind == "eval" else record["loss"] / _LN2
            row = (float(record["step"]), float(record["elapsed"]), float(bpc))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a line cut short by a crash, or not one of ours
        if kind in rows and all(math.isfinite(v) for v in row):
            rows[kind].append(row)
    if not rows["train"] and not rows["eval"]:
        raise CharLSTMError(f"{path} holds no training or validation records yet")
    train = np.array(rows["train"], dtype=np.float64).reshape(-1, 3)
    val = np.array(rows["eval"], dtype=np.float64).reshape(-1, 3)
    return Curves(
        label if label is not None else run_dir.resolve().name,
        *train.T,
        *val.T,
    )


def plot_runs(
    run_dirs: Sequence[str | Path],
    out: str | Path = CURVES_FILE,
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Draw the runs' curves overlaid into one PNG and return its path.

    Left panel: bits per character against optimizer steps; right: against wall time. Each run
    has its own colour; thin lines are the training loss, thick lines with dots validation.
    ``labels`` name the runs in the legend (default: the directory names).
    """
    if not run_dirs:
        raise CharLSTMError("give at least one run directory to plot")
    if labels is not None and len(labels) != len(run_dirs):
        raise CharLSTMError(
            f"{len(labels)} labels for {len(run_dirs)} run directories; give one label per run"
        )
    names = labels if labels is not None else [None] * len(run_dirs)
    curves = [read_curves(d, name) for d, name in zip(run_dirs, names, strict=True)]
    return draw_curves(curves, out, title=title)


def write_curves(run_dir: str | Path) -> Path:
    """Redraw ``run_dir/curves.png`` from its log (what training does at each evaluation)."""
    run_dir = Path(run_dir)
    return draw_curves([read_curves(run_dir)], run_dir / CURVES_FILE, title=run_dir.name)


def draw_curves(curves: Sequence[Curves], out: str | Path, *, title: str | None = None) -> Path:
    """Draw already-read curves into the PNG ``out`` (written whole or not at all)."""
    from matplotlib.figure import Figure  # lazily: only pictures need matplotlib

    out = Path(out)
    longest = max((float(c.train_seconds.max(initial=0)) for c in curves), default=0.0)
    longest = max([longest, *(float(c.val_seconds.max(initial=0)) for c in curves)])
    # Minutes read better than thousands of seconds.
    scale, unit = (60.0, "minutes") if longest > 180 else (1.0, "seconds")

    figure = Figure(figsize=(11, 4.2), dpi=100, layout="constrained")
    by_step, by_time = figure.subplots(1, 2, sharey=True)
    for index, run in enumerate(curves):
        colour = f"C{index % 10}"
        for axes, train_x, val_x in (
            (by_step, run.train_step, run.val_step),
            (by_time, run.train_seconds / scale, run.val_seconds / scale),
        ):
            thin = {"color": colour, "linewidth": 1, "alpha": 0.55}
            thick = {"color": colour, "linewidth": 2.2, "marker": "o", "markersize": 4}
            axes.plot(train_x, run.train_bpc, label=f"{run.label} train", **thin)
            axes.plot(val_x, run.val_bpc, label=f"{run.label} validation", **thick)
    by_step.set_xlabel("optimizer step")
    by_time.set_xlabel(f"wall time ({unit}, evaluation included)")
    by_step.set_ylabel("bits per character")
    top = _y_top(curves)
    if top is not None:
        by_step.set_ylim(top=top)
    for axes in (by_step, by_time):
        axes.grid(True, alpha=0.3)
        axes.set_xlim(left=0)
    by_time.legend(loc="upper right", fontsize="small")
    if title:
        figure.suptitle(title)
    _save_png(figure, out)
    return out


def _y_top(curves: Sequence[Curves]) -> float | None:
    """A top for the y axis that keeps the first steps' ~log2(vocabulary) bits from squashing
    the part of the curves worth looking at: every validation point, most training points."""
    values = [c.val_bpc for c in curves] + [
        np.quantile(c.train_bpc, [0.9]) for c in curves if len(c.train_bpc)
    ]
    joined = np.concatenate(values) if values else np.empty(0)
    if not len(joined):
        return None
    low = float(np.concatenate([*(c.train_bpc for c in curves), joined]).min())
    high = float(joined.max())
    return high + 0.05 * max(high - low, 1e-3)


def _save_png(figure, out: Path) -> None:
    # Through a temporary file beside it: a reader (or a killed run) never sees half a PNG,
    # and the fixed name means a leftover is simply replaced next time.
    temporary = out.with_name(f".tmp-{out.name}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(temporary, format="png")
        os.replace(temporary, out)
    except OSError as e:
        temporary.unlink(missing_ok=True)
        raise CharLSTMError(f"cannot write {out}: {e.strerror or e}") from None
