"""The project's error type for bad user input, and the one reporter every command uses.

A command catches only :class:`UserError` (a bad argument, file, model or config, something the user can fix): it
prints one ``error: ...`` line that names the fix and exits with status 2. Every other exception, a library bug
included, keeps its traceback. This module imports nothing heavy, so a command can use it before torch loads.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

logger = logging.getLogger(__name__)

USER_ERROR_STATUS = 2
"""The exit status of a command stopped by bad input (argparse's, for argument errors)."""


class UserError(ValueError):
    """Input the user can fix: the message says what was wrong and what to change.

    A ``ValueError`` subclass, so library code that raises it keeps working for callers that catch ``ValueError``;
    the commands catch only this type, never plain ``ValueError``.
    """


def one_line(message: object) -> str:
    """``message`` on one line (library messages can span several). An error re-raised from a DataLoader worker
    carries the worker's traceback in its message: only the error's own last line is kept."""
    text = str(message)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split("Error: ", 1)[1] if "Error: " in last else last
    return " ".join(text.split())


def report_error(err: BaseException, what: str = "the command") -> int:
    """Write ``err`` to stderr as one ``error: ...`` line and return :data:`USER_ERROR_STATUS`, for a ``main``.

    The traceback goes to the debug log only: a user error has nothing in it for the user.
    """
    logger.debug("%s failed", what, exc_info=err)
    sys.stderr.write(f"error: {one_line(err)}\n")
    sys.stderr.flush()
    return USER_ERROR_STATUS


def check_writable_folder(folder: str | Path, flag: str) -> Path:
    """Make ``folder`` (with its parents) if it is missing and check that a file can be written in it, before any
    work is done; a :class:`UserError` naming ``flag`` otherwise (a read-only disk, a file in the way, no
    permission), instead of a traceback after the work. Returns the folder."""
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; pass a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as err:
        raise UserError(f"{flag} {path} is not writable ({err.strerror}); pass a folder you can write to") from None
    return path


def run_reporting(body: Callable[[], int | None], what: str = "the command") -> int:
    """Run a command's ``body`` and return its exit status: 0 (or what it returns), or
    :data:`USER_ERROR_STATUS` with one line on stderr for a :class:`UserError`. Other exceptions propagate."""
    try:
        status = body()
    except UserError as err:
        return report_error(err, what)
    return 0 if status is None else status


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``error: ...``) instead of the usage text and the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")

    def parse_or_status(self, argv: list[str] | None) -> argparse.Namespace | int:
        """The parsed arguments, or the exit status (0 for ``--help``, 2 for a bad argument) for a ``main`` that
        returns its status instead of exiting."""
        try:
            return self.parse_args(argv)
        except SystemExit as exit_:
            return exit_.code if isinstance(exit_.code, int) else 2
