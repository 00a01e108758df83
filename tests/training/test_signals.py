"""Tests for ``training.signals``: SIGINT/SIGTERM set a flag instead of killing, and handlers are put back."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

import pytest

from training.signals import StopSignal


def _wait_for(predicate: Any) -> None:
    deadline = time.monotonic() + 5
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_stop_signal_sets_requested_instead_of_killing_and_restores_handlers() -> None:
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with StopSignal() as stop:
        assert signal.getsignal(signal.SIGTERM) is not previous[signal.SIGTERM]
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_for(lambda: stop.requested)
        assert stop.requested and stop.signal_name == "SIGTERM"
        assert stop.any_requested() is True
        # after the first signal the previous handlers are back: a second one stops the process
        assert signal.getsignal(signal.SIGTERM) is previous[signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is previous[signal.SIGINT]
    assert {sig: signal.getsignal(sig) for sig in previous} == previous

    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
        _wait_for(lambda: stop.requested)
        assert stop.signal_name == "SIGINT"
        if previous[signal.SIGINT] is signal.default_int_handler:
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
    assert {sig: signal.getsignal(sig) for sig in previous} == previous

    with StopSignal() as stop:  # no signal: handlers restored on exit
        pass
    assert not stop.requested
    assert {sig: signal.getsignal(sig) for sig in previous} == previous


def test_stop_signal_outside_the_main_thread_installs_nothing(caplog) -> None:
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def worker() -> None:
        with StopSignal():
            seen.append(signal.getsignal(signal.SIGTERM))

    with caplog.at_level(logging.WARNING, logger="training.signals"):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
    assert seen == [before] and "main thread" in caplog.text
