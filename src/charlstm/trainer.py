"""Trainer: a network, its optimizer and its data stream, advanced one optimisation step at a
time (:meth:`Trainer.step`), and the state that lets a run resume exactly
(:meth:`Trainer.train_state`, :meth:`Trainer.restore`).

It knows nothing of budgets, evaluation, logs or files: :mod:`charlstm.session` drives it.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

from charlstm import distributed
from charlstm.batching import IGNORE, make_batcher
from charlstm.config import RunConfig
from charlstm.data import Corpus
from charlstm.device import autocast_dtype
from charlstm.distributed import World
from charlstm.ema import WeightAverage
from charlstm.errors import CharLSTMError
from charlstm.loss import loss_and_grads, summed_loss
from charlstm.model import CharRNN, State, detach_state
from charlstm.optimizer import make_optimizer
from charlstm.shards import Shards, shard_count
from charlstm.train_state import TrainState


class Trainer:
    """One run's network, optimizer, weight average, batches and carried state."""

    def __init__(
        self,
        config: RunConfig,
        corpus: Corpus,
        net: CharRNN,
        device: torch.device,
        world: World = distributed.SINGLE,
    ) -> None:
        self.config, self.tc = config, config.train
        self.net, self.device, self.world = net, device, world
        # Under torchrun: this process's streams of each global batch, and the DDP wrapper
        # whose backward() averages the gradients of all processes (None for one process).
        self.rows = world.rows(self.tc.batch_size)
        self.ddp = world.wrap(net)
        self.autocast = autocast_dtype(device, self.tc.precision)
        self.optimizer = make_optimizer(net, self.tc, self.autocast)
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.average = WeightAverage(net, self.tc.ema) if self.tc.ema > 0 else None
        self.shards = Shards(1 if self.ddp is not None else shard_count(device, self.tc.batch_size))
        # fp16 needs loss scaling to keep small gradients representable; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast == torch.float16)
        self.batcher = make_batcher(
            self.tc.batching, corpus.train, self.tc.batch_size, self.tc.seq_len, self.tc.seed
        )
        self.step_count = 0
        self.state: State | None = None  # carried from batch to batch (stateful batching)
        self.bad_steps = 0  # consecutive steps skipped for a non-finite loss

    def step(self, lr: float) -> float | None:
        """One optimisation step at learning rate ``lr``: forward, loss, backward, clip,
        optimizer, weight average. Returns the mean loss per scored character, or None when
        the step was skipped for a non-finite loss or gradient."""
        batch = self.batcher.next_batch()  # the global batch: the same in every process
        # The mean over the whole batch's scored targets, whichever shard or process each one
        # is in. DDP averages gradients over the processes, hence the factor world.size.
        scored = max(int((batch.targets != IGNORE).sum()), 1)
        if self.world.size > 1:
            batch = batch.rows(self.rows)
        if batch.reset_state or self.state is None:
            self.state = self.net.initial_state(len(batch.inputs))
        x = torch.from_numpy(batch.inputs).to(self.device, non_blocking=True)
        y = torch.from_numpy(batch.targets).to(self.device, non_blocking=True)
        shard_loss = self._shard_loss if self.ddp is None else self._ddp_shard_loss
        weighted = functools.partial(shard_loss, weight=self.world.size / scored)
        loss, grads, new_state = self.shards.run(weighted, x, y, self.state)
        for parameter, grad in zip(self.params, grads, strict=True):
            parameter.grad = grad
        self.scaler.unscale_(self.optimizer)
        clip = self.tc.grad_clip if self.tc.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), clip)
        # Summed over the processes, so that all of them skip a step that is bad in any one.
        value, bad_norm = self.world.sum([loss.item(), not math.isfinite(float(norm))])
        value /= self.world.size
        if not math.isfinite(value) or bad_norm:
            self._skip_bad_step(value)
            return None
        self.bad_steps = 0
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.average is not None:
            self.average.update(self.step_count)
        self.state = new_state
        self.step_count += 1
        return value

    def _shard_loss(
        self, x: torch.Tensor, y: torch.Tensor, state: State, generator: torch.Generator | None,
        weight: float,
    ) -> tuple[torch.Tensor, list[torch.Tensor], State]:  # fmt: skip
        """Loss (weighted sum over this shard of the batch), its gradients and the new state."""
        return loss_and_grads(self.net, x, y, state, weight, self.params, generator=generator,
                              autocast=self.autocast_context, scale=self.scaler.scale)  # fmt: skip

    def _ddp_shard_loss(
        self, x: torch.Tensor, y: torch.Tensor, state: State, generator: torch.Generator | None,
        weight: float,
    ) -> tuple[torch.Tensor, list[torch.Tensor], State]:  # fmt: skip
        """:meth:`_shard_loss` through DistributedDataParallel, whose backward() leaves in
        every process the average of all processes' gradients."""
        assert self.ddp is not None
        for parameter in self.params:
            parameter.grad = None
        with self.autocast_context():
            logits, new_state = self.ddp(x, state, generator=generator)
        loss = summed_loss(logits, y) * weight
        self.scaler.scale(loss).backward()
        return loss.detach(), [p.grad for p in self.params], detach_state(new_state)

    def _skip_bad_step(self, value: float) -> None:
        # Applying a non-finite update would poison every weight: drop it and keep the old state.
        self.bad_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.update()
        if self.bad_steps >= self.config.session.max_bad_steps:
            hint = f"try a lower --lr (now {self.tc.lr:g})"
            if self.autocast is not None:
                hint += " or --precision fp32"
            raise CharLSTMError(
                f"the loss was not finite ({value}) for {self.bad_steps} steps in a row at step "
                f"{self.step_count + 1}; {hint}"
            )

    def autocast_context(self) -> contextlib.AbstractContextManager:
        """The run's reduced-precision arithmetic (entered per thread: autocast is)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    # ---- the model a run reports and saves ------------------------------------------------

    def model_weights(self) -> dict[str, torch.Tensor]:
        """What a checkpoint's model.safetensors holds: the weight average, if one is kept."""
        weights = self.net.state_dict()
        if self.average is not None:
            weights.update(self.average.average)
        return weights

    def averaged(self) -> contextlib.AbstractContextManager:
        """The weight average in the network for the duration (nothing to do without one)."""
        return contextlib.nullcontext() if self.average is None else self.average.applied()

    # ---- resuming -------------------------------------------------------------------------

    def train_state(
        self, elapsed: float, best_val: float | None, log_window: tuple[float, int],
        eval_slice: int | None,
    ) -> TrainState:  # fmt: skip
        """The state to save beside the weights. Under torchrun every process's generators and
        carried state are gathered (rank 0 saves them): a run resumes on any number of them."""
        optimizer = self.optimizer.state_dict()
        carried = None
        if self.state is not None:
            carried = tuple(torch.cat(self.world.gather(part), dim=1) for part in self.state)
        cuda_rng = []
        if self.device.type == "cuda":
            cuda_rng = self.world.gather(torch.cuda.get_rng_state(self.device))
        return TrainState(
            step=self.step_count,
            elapsed=elapsed,
            best_val=best_val,
            batcher=self.batcher.state_dict(),
            param_groups=optimizer["param_groups"],
            optimizer_moments=optimizer["state"],
            scaler=self.scaler.state_dict(),
            log_window=log_window,
            eval_slice=eval_slice,
            world_size=self.world.size,
            carried=carried,
            rng=self.world.gather(torch.get_rng_state()),
            cuda_rng=cuda_rng,
            training_weights=self.average.training_weights() if self.average else {},
        )

    def restore(self, weights: dict[str, torch.Tensor], saved: TrainState) -> None:
        """Continue from a checkpoint's weights and state. Raises ValueError (or another
        exception of the checks) for a state that does not fit this run."""
        sizes = [p.numel() for group in self.optimizer.param_groups for p in group["params"]]
        saved.check_fits(sizes, self.net.initial_state(self.tc.batch_size)[0].shape)
        self.net.load_state_dict(weights)
        if self.average is not None:
            self.average.restore(weights, saved.training_weights or weights)
        try:
            self.optimizer.load_state_dict(
                {"state": saved.optimizer_moments, "param_groups": saved.param_groups}
            )
        except (ValueError, KeyError) as e:  # e.g. AdamW's state, saved before Muon existed
            raise CharLSTMError(
                f"the checkpoint holds the state of another optimizer than --optimizer "
                f"{self.tc.optimizer} ({e}); start a new run from it instead of resuming"
            ) from None
        if saved.scaler:
            self.scaler.load_state_dict(saved.scaler)
        self.step_count = saved.step
        self.batcher.load_state_dict(saved.batcher)
        rank = self.world.rank
        if rank < len(saved.rng):  # this process's own generator
            torch.set_rng_state(saved.rng[rank])
        else:  # a process the saving run did not have: a generator of its own
            torch.manual_seed(distributed.rank_seed(self.tc.seed, rank, self.step_count))
        if rank < len(saved.cuda_rng) and self.device.type == "cuda":
            torch.cuda.set_rng_state(saved.cuda_rng[rank], self.device)
        if saved.carried is not None:  # the whole batch's state: this process's rows of it
            self.state = tuple(part[:, self.rows].to(self.device) for part in saved.carried)
