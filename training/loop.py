"""The bookkeeping of a training loop around a command's own loss: steps, epochs, resume, NaN skips, logs, checkpoints.

A trainer keeps its forward pass, loss and update in view and hands the rest to :class:`TrainLoop`::

    loop = TrainLoop(accelerator, dataloader, config, checkpoints_dir=..., stateful=..., generators=...,
                     epoch_setters=(batch_sampler, dataset))
    loop.resume(resolve_resume(checkpoints_dir, config.resume))
    with loop:                                      # SIGINT/SIGTERM now request a checkpoint and a clean stop
        for batch in loop.batches():                # epochs, set_epoch, skip_first_batches after a resume
            with accelerator.accumulate(model):
                loss = ...
                loop.backward_and_step(loss, optimizer, lr_scheduler, params)  # skipped if non-finite anywhere
            if accelerator.sync_gradients:
                loop.end_step({"lr": ...})          # count, NaN streak, logs, stop signal
                loop.checkpoint_if_due()            # every N steps, at the end, on a stop signal
                if loop.due(config.validation_steps):
                    ...                             # the trainer's own evaluation

Resuming is exact because the checkpoint holds every stateful object and generator, and the position in the data is a
function of the step: an epoch of ``b`` batches holds ``ceil(b / accumulation)`` steps (accelerate ends a step at the
end of each epoch), which gives the epoch to seed and the batches to skip. A non-finite loss on any process skips the
whole update on every process; ``max_nan_steps`` in a row stop the run with an error that points at the last good
checkpoint. The settings it reads are :class:`StepSettings` (:class:`training.command.LoopConfig` has them, and so does
the text-to-image ``TrainConfig``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ldm.errors import UserError
from training.checkpoint import Stateful, load_checkpoint, save_checkpoint
from training.config import to_dict
from training.launch import is_sharded_run
from training.signals import StopSignal
from training.validation import loss_curve_png

logger = logging.getLogger("training")


class StepSettings(Protocol):
    """The settings :class:`TrainLoop` reads (``LoopConfig`` and the text-to-image ``TrainConfig`` have them)."""

    max_train_steps: int
    gradient_accumulation_steps: int
    checkpointing_steps: int
    checkpoints_total_limit: int | None
    max_nan_steps: int
    log_steps: int
    max_grad_norm: float


# --------------------------------------------------------------------------------------------------------------------
# The loop


class TrainLoop:
    """Steps, epochs, resume position, non-finite losses, logs, checkpoints and stop signals of one training run.

    Args:
        accelerator: the run's accelerator; ``dataloader`` must be the prepared one.
        dataloader: yields the micro-batches; ``len`` is the batches per epoch.
        settings: ``max_train_steps``, ``gradient_accumulation_steps``, ``checkpointing_steps``,
            ``checkpoints_total_limit``, ``max_nan_steps``, ``log_steps``, ``max_grad_norm`` (a
            :class:`LoopConfig`); a dataclass is also stored in each checkpoint's meta.
        checkpoints_dir: where :func:`training.checkpoint.save_checkpoint` writes.
        stateful: everything a checkpoint holds (unwrapped models, optimizer, LR scheduler, ...).
        generators: the named generators of every random draw of the loop.
        epoch_setters: objects whose ``set_epoch`` must follow the dataloader's (the batch sampler, the dataset).
        fingerprint: what else defines the run (e.g. the data's hash), stored in each checkpoint's meta.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        dataloader: DataLoader,
        settings: StepSettings,
        *,
        checkpoints_dir: str | Path,
        stateful: Mapping[str, Stateful],
        generators: Mapping[str, torch.Generator],
        epoch_setters: Sequence[Any] = (),
        fingerprint: Mapping[str, str] | None = None,
    ) -> None:
        self.accelerator = accelerator
        self.fingerprint = dict(fingerprint or {})
        self.dataloader = dataloader
        self.settings = settings
        self.checkpoints_dir = Path(checkpoints_dir)
        self.stateful = stateful
        self.generators = generators
        self.epoch_setters = tuple(epoch_setters)
        self.step = 0
        self.resumed_step: int | None = None  # the step of the checkpoint the run resumed from, if any
        self.losses: list[tuple[int, float]] = []  # (step, loss) of every applied update
        self.stopping = False  # a stop signal seen by any process, agreed on by all at the same step
        self._stop: StopSignal | None = None
        self._progress: tqdm | None = None
        self._nan_streak = 0
        self._skip_update = False
        self._window_loss = 0.0
        self._window_started = self._started = time.perf_counter()
        self._step_ends: list[float] = []  # when each step of this process's loop ended
        self._first_step = 0

    # ---------------------------------------------------------------------------------------------- state
    @property
    def done(self) -> bool:
        """All ``max_train_steps`` are done."""
        return self.step >= self.settings.max_train_steps

    @property
    def finished(self) -> bool:
        """Done, or stopped by a signal."""
        return self.done or self.stopping

    @property
    def stopped_early(self) -> bool:
        """A stop signal ended the run before ``max_train_steps`` (its last checkpoint is written)."""
        return self.stopping and not self.done

    @property
    def update_allowed(self) -> bool:
        """No micro-batch of the current step had a non-finite loss (on any process)."""
        return not self._skip_update

    @property
    def steps_per_second(self) -> float:
        """Optimizer steps per second of this process's loop so far (evaluation and checkpoints included)."""
        return (self.step - self._first_step) / max(time.perf_counter() - self._started, 1e-9)

    @property
    def steady_steps_per_second(self) -> float | None:
        """The step rate once warmed up: between the end of the first quarter of this process's steps (at most 10;
        the first steps pay for kernel selection and caches) and the end of the last step (so not the final
        checkpoint); None with fewer than 4 steps."""
        ends = self._step_ends
        if len(ends) < 4:
            return None
        skip = min(10, len(ends) // 4)
        return (len(ends) - 1 - skip) / max(ends[-1] - ends[skip], 1e-9)

    def summary(self) -> dict[str, float | None]:
        """The run's figures for ``metrics.json``: steps done, the step rate over the whole loop (checkpoints and
        evaluations included) and once warmed up (:attr:`steady_steps_per_second`)."""
        return {
            "steps": self.step,
            "train_steps_per_s": self.steps_per_second,
            "train_steps_per_s_steady": self.steady_steps_per_second,
        }

    def save_loss_curve(self, path: str | Path) -> Path | None:
        """A PNG of the loss of every applied update (:func:`training.validation.loss_curve_png`), if there is one."""
        return loss_curve_png(*zip(*self.losses), path) if self.losses else None

    def due(self, every: int) -> bool:
        """Whether the step just ended is a multiple of ``every`` or the last one."""
        return self.step % every == 0 or self.done

    def resume(self, checkpoint: Path | None) -> dict[str, Any] | None:
        """Restore every stateful object, generator and the step from ``checkpoint`` (None: start fresh)."""
        if checkpoint is None:
            return None
        meta = load_checkpoint(checkpoint, self.stateful, generators=self.generators, accelerator=self.accelerator)
        self.step = self.resumed_step = int(meta["step"])
        # the loss history so far, so loss.png covers the whole run (older checkpoints have none)
        self.losses = [(int(step), float(loss)) for step, loss in meta.get("losses", []) if step <= self.step]
        logger.info("resumed from %s at step %d", checkpoint, self.step)
        return meta

    # ---------------------------------------------------------------------------------------------- the loop
    def __enter__(self) -> TrainLoop:
        self._stop = StopSignal().__enter__()
        self._progress = tqdm(
            total=self.settings.max_train_steps,
            initial=self.step,
            desc="steps",
            disable=not self.accelerator.is_main_process,
        )
        self._first_step = self.step
        self._started = self._window_started = time.perf_counter()
        self._step_ends = []
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.close()
        if self._stop is not None:
            self._stop.__exit__(*exc_info)
        if self.stopped_early:
            logger.info("stopped by signal at step %d; resume with --resume latest", self.step)

    def batches(self) -> Iterator[Any]:
        """The micro-batches from the current step to the end (or a stop signal), epoch after epoch.

        Each epoch first sets the epoch of the dataloader and of ``epoch_setters``; after a resume the batches the
        finished steps used are skipped (``accelerator.skip_first_batches``), so the data continues exactly.
        """
        if self._stop is None:
            raise RuntimeError("iterate TrainLoop.batches() inside `with loop:` (it installs the stop signal)")
        batches_per_epoch = len(self.dataloader)
        if batches_per_epoch == 0:
            raise UserError("the training data gives no batch per epoch; lower --train-batch-size")
        accumulation = self.settings.gradient_accumulation_steps
        # accelerate also ends an optimizer step at the end of every epoch (its sync_with_dataloader default), so an
        # epoch holds ceil(batches / accumulation) steps, the last of them possibly with fewer micro-batches
        epoch, step_in_epoch = divmod(self.step, math.ceil(batches_per_epoch / accumulation))
        skip = step_in_epoch * accumulation
        while not self.finished:
            # accelerate's loader re-sets its sampler's epoch from its own counter when iterated: set them all.
            for target in (self.dataloader, *self.epoch_setters):
                if hasattr(target, "set_epoch"):
                    target.set_epoch(epoch)
            loader = self.accelerator.skip_first_batches(self.dataloader, skip) if skip else self.dataloader
            skip = 0
            for batch in loader:
                yield batch
                if self.finished:
                    return
            epoch += 1

    def observe_loss(self, loss: torch.Tensor) -> bool:
        """Whether ``loss`` is finite on every process (a collective); a non-finite one skips the step's update."""
        finite = bool(self.accelerator.gather(torch.isfinite(loss.detach()).float().reshape(1)).min() > 0)
        if finite:
            self._window_loss += loss.detach().item() / self.settings.gradient_accumulation_steps
        else:
            self._skip_update = True
        return finite

    def backward_and_step(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any,
        params: Sequence[torch.nn.Parameter],
    ) -> float | None:
        """One micro-batch's update, inside ``accelerator.accumulate``: back-propagate a finite ``loss``, then on the
        step's last micro-batch clip the gradients to ``max_grad_norm`` and step the optimizer and LR scheduler,
        unless a micro-batch of this step had a non-finite loss. Returns the gradient norm when it was clipped."""
        if self.observe_loss(loss):
            self.accelerator.backward(loss)
        grad_norm = None
        if self.accelerator.sync_gradients and self.update_allowed:
            if is_sharded_run(self.accelerator):
                params = _in_model_order(self.accelerator, params)
            grad_norm = float(self.accelerator.clip_grad_norm_(params, self.settings.max_grad_norm))
        if self.update_allowed:
            optimizer.step()
            lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def end_step(self, logs: Mapping[str, float] | None = None) -> bool:
        """Count the optimizer step that just ended; return whether its update was applied.

        Tracks non-finite steps (raising ``RuntimeError`` after ``max_nan_steps`` in a row), logs the loss, the
        step rate and ``logs`` every ``log_steps``, and checks for a stop signal on every process.
        """
        self.step += 1
        self._step_ends.append(time.perf_counter())
        if self._progress is not None:
            self._progress.update(1)
        updated = not self._skip_update
        if updated:
            self._nan_streak = 0
            self.losses.append((self.step, self._window_loss))
        else:
            self._nan_streak += 1
            logger.warning("step %d: non-finite loss; update skipped (%d in a row)", self.step, self._nan_streak)
            if self._nan_streak >= self.settings.max_nan_steps:
                raise RuntimeError(
                    f"{self._nan_streak} non-finite losses in a row at step {self.step}; stopping. The last good "
                    f"checkpoint is in {self.checkpoints_dir}: resume from it with a lower --learning-rate, or "
                    "check the data"
                )
        loss, self._window_loss, self._skip_update = self._window_loss, 0.0, False
        if self.step % self.settings.log_steps == 0:
            now = time.perf_counter()
            values = {
                "loss": loss,
                **(logs or {}),
                "steps_per_s": self.settings.log_steps / (now - self._window_started),
            }
            self._window_started = now
            self.accelerator.log(values, step=self.step)
            logger.info("step %d: %s", self.step, ", ".join(f"{k} {_fmt(v)}" for k, v in values.items()))
            if self._progress is not None:
                self._progress.set_postfix(loss=f"{loss:.4f}")
        assert self._stop is not None
        self.stopping = self._stop.any_requested(self.accelerator)
        return updated

    def checkpoint_if_due(self) -> Path | None:
        """Write a checkpoint every ``checkpointing_steps``, at the last step and on a stop signal."""
        if not (self.step % self.settings.checkpointing_steps == 0 or self.done or self.stopping):
            return None
        losses = [[step, loss] for step, loss in self.losses]
        meta: dict[str, Any] = {"step": self.step, "fingerprint": self.fingerprint, "losses": losses}
        if dataclasses.is_dataclass(self.settings):
            meta["config"] = to_dict(self.settings)
        return save_checkpoint(
            self.checkpoints_dir,
            self.step,
            self.stateful,
            generators=self.generators,
            meta=meta,
            accelerator=self.accelerator,
            total_limit=self.settings.checkpoints_total_limit,
        )


def _in_model_order(accelerator: Accelerator, params: Sequence[torch.nn.Parameter]) -> Sequence[torch.nn.Parameter]:
    """The current parameters of the prepared model that ``params`` are (as many), else ``params``. FSDP2 swaps a
    module's parameters for their gathered versions while it runs (the root module's stay gathered from the forward
    pass to the end of the backward one) and re-registers the shards afterwards, so a list taken before the backward
    pass is stale; accelerate clips a sharded model's gradients only when given its very list of parameters."""
    for model in accelerator._models:
        current = list(model.parameters())
        if len(current) == len(params):
            return current
    return params


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)
