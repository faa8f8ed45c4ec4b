"""TrainState: what a ``last/`` checkpoint holds beside the weights so that a run resumes
exactly: optimizer moments, random generators, carried hidden state, data position, clock.

It becomes resume.safetensors (tensors, named by :mod:`charlstm.checkpoint`) and resume.json
(the rest) with :meth:`TrainState.to_files`, and comes back, checked field by field, with
:meth:`TrainState.from_files`: a resume state that does not fit is refused before the first
step, never met in the middle of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from charlstm.checkpoint import (
    RESUME_CARRIED_STATE,
    RESUME_CUDA_RNG,
    RESUME_OPTIMIZER,
    RESUME_RANK_SUFFIX,
    RESUME_RNG,
    RESUME_TRAINING_WEIGHTS,
    read_resume_state,
)
from charlstm.errors import CharLSTMError
from charlstm.metrics_log import is_count


@dataclass
class TrainState:
    """A training run's state between two steps (the whole batch's, under torchrun)."""

    step: int
    elapsed: float  # seconds of training so far, over all sessions of the run
    best_val: float | None  # the best validation loss so far (nats per character)
    batcher: dict[str, int]  # the data position (see charlstm.batching)
    param_groups: list[dict[str, Any]]  # the optimizer's hyper-parameters
    optimizer_moments: dict[int, dict[str, torch.Tensor]]  # per parameter index
    scaler: dict[str, Any]  # fp16's loss scale
    log_window: tuple[float, int]  # summed loss and steps since the last train log record
    eval_slice: int | None  # validation characters periodic evaluations score (None: all)
    world_size: int  # processes that trained it (it resumes on any number)
    carried: tuple[torch.Tensor, ...] | None  # (n_layers, batch, hidden) each, or None
    rng: list[torch.Tensor]  # each process's torch generator state, by rank
    cuda_rng: list[torch.Tensor] = field(default_factory=list)  # likewise, on CUDA
    training_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # with --ema

    def to_files(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The tensors of resume.safetensors and the document of resume.json."""
        tensors: dict[str, torch.Tensor] = {}
        for prefix, states in ((RESUME_RNG, self.rng), (RESUME_CUDA_RNG, self.cuda_rng)):
            for rank, value in enumerate(states):
                tensors[prefix + (RESUME_RANK_SUFFIX.format(rank) if rank else "")] = value
        for i, part in enumerate(self.carried or ()):
            tensors[f"{RESUME_CARRIED_STATE}{i}"] = part
        for index, moments in self.optimizer_moments.items():
            for key, value in moments.items():
                tensors[f"{RESUME_OPTIMIZER}{index}.{key}"] = torch.as_tensor(value)
        for name, value in self.training_weights.items():
            tensors[RESUME_TRAINING_WEIGHTS + name] = value
        document = {
            "step": self.step,
            "elapsed": self.elapsed,
            "best_val": self.best_val,
            "batcher": self.batcher,
            "param_groups": self.param_groups,
            "scaler": self.scaler,
            "carried_state": self.carried is not None,
            "log_window": list(self.log_window),
            "world_size": self.world_size,
            "eval_slice": self.eval_slice,
        }
        return tensors, document

    @classmethod
    def from_files(cls, tensors: dict[str, torch.Tensor], document: dict[str, Any]) -> TrainState:
        """Rebuild from :meth:`to_files` output; raises ValueError or KeyError, naming the
        field, for anything a run does not write."""
        _check_document(document)
        moments: dict[int, dict[str, torch.Tensor]] = {}
        carried: dict[int, torch.Tensor] = {}
        training_weights = {}
        for name, value in tensors.items():
            if name.startswith(RESUME_OPTIMIZER):
                index, key = name[len(RESUME_OPTIMIZER) :].split(".", 1)
                moments.setdefault(int(index), {})[key] = value
            elif name.startswith(RESUME_CARRIED_STATE):
                carried[int(name[len(RESUME_CARRIED_STATE) :])] = value
            elif name.startswith(RESUME_TRAINING_WEIGHTS):
                training_weights[name[len(RESUME_TRAINING_WEIGHTS) :]] = value
        if document["carried_state"] and sorted(carried) != list(range(len(carried) or 1)):
            raise ValueError(f"resume.safetensors holds carried state parts {sorted(carried)}")
        return cls(
            step=document["step"],
            elapsed=float(document["elapsed"]),
            best_val=document["best_val"],
            batcher=document["batcher"],
            param_groups=document["param_groups"],
            optimizer_moments=moments,
            scaler=document.get("scaler") or {},
            log_window=(float(document["log_window"][0]), int(document["log_window"][1])),
            eval_slice=document.get("eval_slice"),
            world_size=int(document.get("world_size", 1)),
            carried=tuple(carried[i] for i in sorted(carried))
            if document["carried_state"]
            else None,
            rng=_by_rank(tensors, RESUME_RNG),
            cuda_rng=_by_rank(tensors, RESUME_CUDA_RNG),
            training_weights=training_weights,
        )

    @classmethod
    def read(cls, directory: Path, restore: Callable[[TrainState], None]) -> TrainState:
        """The state saved in the ``last/`` checkpoint ``directory``, handed to ``restore``
        (which raises for a state that does not fit the run); anything wrong with it becomes
        one CharLSTMError line."""
        tensors, document = read_resume_state(directory)
        try:
            state = cls.from_files(tensors, document)
            restore(state)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            what = f"{type(e).__name__}: {e}".strip().splitlines()[0][:200]
            raise CharLSTMError(
                f"{directory}: its resume state does not fit this run ({what}); start a new run "
                "instead (--overwrite, or another --out)"
            ) from None
        except CharLSTMError as e:
            raise CharLSTMError(f"{directory}: {e}") from None
        return state

    def check_fits(self, parameter_sizes: list[int], carried_shape: torch.Size) -> None:
        """Raise ValueError unless the optimizer moments fit parameters of ``parameter_sizes``
        (in the optimizer's order) and the carried state has ``carried_shape``."""
        for index, moments in self.optimizer_moments.items():
            if index >= len(parameter_sizes):
                raise ValueError(
                    f"optimizer moments for parameter {index} of {len(parameter_sizes)}"
                )
            for key, value in moments.items():
                if value.dim() > 0 and value.numel() != parameter_sizes[index]:
                    raise ValueError(
                        f"{RESUME_OPTIMIZER}{index}.{key} has {value.numel()} values for a "
                        f"parameter of {parameter_sizes[index]}"
                    )
        for i, part in enumerate(self.carried or ()):
            if part.shape != carried_shape:
                raise ValueError(
                    f"{RESUME_CARRIED_STATE}{i} has shape {list(part.shape)}, not "
                    f"{list(carried_shape)}"
                )


def _by_rank(tensors: dict[str, torch.Tensor], prefix: str) -> list[torch.Tensor]:
    """The per-rank states saved under ``prefix``, rank 0 first, up to the first rank missing."""
    states = []
    while True:
        rank = len(states)
        name = prefix + (RESUME_RANK_SUFFIX.format(rank) if rank else "")
        if name not in tensors:
            return states
        states.append(tensors[name])


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


_CHECKS = {
    "step": is_count,
    "elapsed": lambda v: _number(v) and math.isfinite(v),
    "best_val": lambda v: v is None or (_number(v) and math.isfinite(v)),
    "batcher": lambda v: isinstance(v, dict) and v and all(map(is_count, v.values())),
    "param_groups": lambda v: isinstance(v, list) and all(isinstance(g, dict) for g in v),
    "scaler": lambda v: isinstance(v, dict),
    "carried_state": lambda v: isinstance(v, bool),
    "log_window": lambda v: isinstance(v, list) and len(v) == 2 and _number(v[0])
    and is_count(v[1]),
    "world_size": lambda v: is_count(v) and v >= 1,
    "eval_slice": lambda v: v is None or is_count(v),
}  # fmt: skip
_OPTIONAL = ("scaler", "eval_slice", "world_size")  # absent from runs saved before they existed


def _check_document(document: dict[str, Any]) -> None:
    """Raise KeyError or ValueError unless resume.json's fields have the types and ranges a
    run writes."""
    for name, valid in _CHECKS.items():
        if name not in document and name not in _OPTIONAL:
            raise KeyError(f"resume.json lacks {name}")
        if name in document and not valid(document[name]):
            raise ValueError(f"resume.json has {name} = {str(document[name])[:60]}")
