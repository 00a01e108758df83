"""Graceful stop: turn SIGINT (Ctrl-C) and SIGTERM into a flag the training loop checks, to checkpoint and exit.

Typical use (with ``training.checkpoint``)::

    with StopSignal() as stop:
        while step < max_steps:
            ...
            if stop.any_requested(accelerator):
                save_checkpoint(...)
                break
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)


class StopSignal:
    """While active, SIGINT (Ctrl-C) and SIGTERM set ``requested`` instead of stopping the process.

    The training loop checks ``requested`` (or :meth:`any_requested` with several processes), writes a checkpoint and
    exits cleanly. After the first signal the previous handlers are back, so a second Ctrl-C stops at once. Signals
    that were ignored (``SIG_IGN``, e.g. SIGINT of a background job) stay ignored. Handlers can only be installed in
    the main thread; elsewhere this is a no-op with a warning.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._signals = tuple(signals)
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is not threading.main_thread():
            logger.warning(
                "StopSignal is not in the main thread, so it cannot catch signals; Ctrl-C and SIGTERM stop "
                "the process as usual"
            )
            return self
        for sig in self._signals:
            previous = signal.getsignal(sig)
            if previous is signal.SIG_IGN:
                continue
            self._previous[sig] = previous
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        logger.warning(
            "received %s: finishing the current step, then saving a checkpoint and stopping (send it "
            "again to stop at once)",
            self.signal_name,
        )
        self._restore()

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    def any_requested(self, accelerator: Accelerator | None = None) -> bool:
        """Whether any process received a stop signal; with several processes every one must call this at the
        same point (it is a collective), so that all of them stop and checkpoint at the same step."""
        if accelerator is None or accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
