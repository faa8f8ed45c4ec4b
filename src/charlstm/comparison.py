"""The cell experiment: train rnn, gru and lstm with equal settings and an equal wall-clock
budget on the same text, then tabulate and plot what each reached.

Each cell is an ordinary run directory, ``OUT/<cell>/``, trained by :func:`charlstm.train`
from the same :class:`~charlstm.config.RunConfig` with only ``cell`` (and ``out``) changed; so
"equal settings" means equal hyper-parameters, not equal parameter counts (a vanilla RNN has a
quarter of an LSTM's recurrent weights at the same width), which is the comparison the seed's
claim makes. ``OUT/`` also gets ``compare.md`` (the table), ``compare.json`` and
``compare.png`` (all curves overlaid).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from charlstm.budget import BudgetTooSmall
from charlstm.config import CELLS, COMPARE_BUDGET, COMPARE_CELLS, RunConfig
from charlstm.errors import CharLSTMError
from charlstm.plot import plot_runs
from charlstm.training import TrainResult, train

TABLE_FILE, JSON_FILE, PLOT_FILE = "compare.md", "compare.json", "compare.png"


@dataclass(frozen=True)
class CellResult:
    """What one cell reached within the budget.

    A cell that could not train (its budget was refused) or trained too few steps to mean
    anything has no loss: ``note`` says why, and the table shows that instead of a number.
    """

    cell: str
    run_dir: str
    parameters: int
    steps: int
    characters: int  # training characters read: steps x batch size x sequence length
    loss: float | None  # best validation loss, nats per character
    bpc: float | None
    perplexity: float | None
    seconds: float  # wall time of the run, evaluation and checkpoints included
    note: str = ""

    @property
    def is_result(self) -> bool:
        """Whether the cell trained enough for its loss to be compared."""
        return self.loss is not None


@dataclass
class Comparison:
    """The rows of a comparison, in the order the cells were trained, and where it was written."""

    out: Path
    rows: list[CellResult] = field(default_factory=list)
    plot: Path | None = None

    def table(self) -> str:
        """The results as a Markdown table (what ``charlstm compare`` prints)."""
        lines = [
            "| cell | parameters | steps | characters trained | best validation (nats/char) "
            "| bpc | perplexity | time |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in self.rows:
            if r.loss is None or r.bpc is None or r.perplexity is None:
                reached = f"no result: {r.note} | | "
            else:
                reached = f"{r.loss:.4f} | {r.bpc:.3f} | {r.perplexity:.2f} "
            lines.append(
                f"| {r.cell} | {r.parameters:,} | {r.steps:,} | {r.characters:,} | {reached}| "
                f"{_duration(r.seconds)} |"
            )
        return "\n".join(lines)


def compare(
    config: RunConfig | None = None,
    *,
    cells: Sequence[str] = COMPARE_CELLS,
    out: str | Path | None = None,
    time_budget: str | None = COMPARE_BUDGET,
    progress: bool = True,
) -> Comparison:
    """Train each of ``cells`` as ``config`` says into ``out/<cell>/``; table and plot them.

    ``time_budget`` is each cell's wall-clock budget and replaces the config's (None keeps the
    config's own limits). ``out`` defaults to the config's ``out``, else
    ``runs/compare-<corpus>-<time>``. With ``resume="auto"`` in the config a comparison that
    was stopped continues: finished cells are read back, the others resume or start.
    """
    config = config or RunConfig()
    cells = _check_cells(cells)
    if config.session.resume not in (None, "auto"):
        raise CharLSTMError(
            f"--resume {config.session.resume}: a comparison resumes all its cells at once; use "
            "--resume auto with the same --out"
        )
    out = Path(out or config.session.out or _default_out(config)).expanduser()
    overrides = {} if time_budget is None else {"time_budget": time_budget}
    configs = {
        cell: config.with_overrides({**overrides, "cell": cell, "out": str(out / cell)}).validate()
        for cell in cells
    }
    _check_fresh(out, cells, config)  # before anything trains, not ten minutes in
    comparison = Comparison(out)
    for number, cell in enumerate(cells, 1):
        print(f"compare: cell {number} of {len(cells)}: {cell} -> {out / cell}", file=sys.stderr)
        try:
            result = train(configs[cell], progress=progress)
        except BudgetTooSmall as e:  # the other cells may still fit: mark this one, go on
            print(f"compare: {cell} could not train: {e}", file=sys.stderr)
            comparison.rows.append(_refused(cell, out / cell, "its budget was too small"))
            continue
        if result.model is None or result.best_val is None:
            continue  # a torchrun rank other than 0: it trains every cell, rank 0 reports
        comparison.rows.append(_cell_result(cell, configs[cell], result))
    if len(comparison.rows) < len(cells):
        return comparison  # nothing to report on this rank
    trained = [row for row in comparison.rows if row.is_result]
    if not trained:
        raise CharLSTMError(
            "no cell trained long enough to compare (see the messages above): give a longer "
            "--time-budget or a smaller model"
        )
    budget = configs[cells[0]].session.budget_seconds()
    each = f", {_duration(budget)} each" if budget else ""
    comparison.plot = plot_runs(
        [row.run_dir for row in trained],
        out / PLOT_FILE,
        labels=[row.cell for row in trained],
        title=f"{' vs '.join(cells)} on {', '.join(config.data.data)}{each}",
    )
    _write(out / TABLE_FILE, comparison.table() + "\n")
    rows = [asdict(row) for row in comparison.rows]
    _write(out / JSON_FILE, json.dumps({"config": config.to_dict(), "rows": rows}, indent=2))
    return comparison


def _cell_result(cell: str, config: RunConfig, result: TrainResult) -> CellResult:
    """The table row of a trained cell; a run too short to mean anything shows no loss."""
    assert result.model is not None and result.best_val is not None
    val = None if result.warnings else result.best_val
    return CellResult(
        cell=cell,
        run_dir=str(result.run_dir),
        parameters=result.model.net.num_parameters(),
        steps=result.steps,
        characters=result.steps * config.train.batch_size * config.train.seq_len,
        loss=val.loss if val else None,
        bpc=val.bpc if val else None,
        perplexity=val.perplexity if val else None,
        seconds=result.elapsed,
        note=f"only {result.steps} steps" if result.warnings else "",
    )


def _refused(cell: str, run_dir: Path, why: str) -> CellResult:
    return CellResult(cell, str(run_dir), 0, 0, 0, None, None, None, 0.0, note=why)


def _check_cells(cells: Sequence[str]) -> tuple[str, ...]:
    cells = tuple(cells)
    if not cells:
        raise CharLSTMError(f"--cells needs at least one of {', '.join(CELLS)}")
    unknown = [c for c in cells if c not in CELLS]
    if unknown:
        raise CharLSTMError(f"--cells: unknown cell {unknown[0]!r}; choose from {', '.join(CELLS)}")
    if len(set(cells)) != len(cells):
        raise CharLSTMError(f"--cells names a cell twice: {' '.join(cells)}")
    return cells


def _check_fresh(out: Path, cells: Sequence[str], config: RunConfig) -> None:
    """Refuse to mix a new comparison into an old one, naming the flags that would proceed."""
    if config.session.overwrite or config.session.resume == "auto":
        return
    for cell in cells:
        run_dir = out / cell
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise CharLSTMError(
                f"{run_dir} already exists; use --resume auto to continue the comparison in "
                f"{out} or --overwrite to start it again"
            )


def _default_out(config: RunConfig) -> Path:
    name = Path(config.data.data[0]).stem or "corpus"
    return Path("runs") / f"compare-{name}-{datetime.now():%Y%m%d-%H%M%S}"


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise CharLSTMError(f"cannot write {path}: {e.strerror or e}") from None


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"
