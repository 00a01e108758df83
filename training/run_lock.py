"""One run per output folder: a lock file that names its holder, so a second run into the same ``--output-dir``
is refused at once instead of deleting the first one's temporary checkpoint or silently replacing its model.

The lock is ``OUTPUT_DIR/.lock``, created atomically (``O_EXCL``) with the holder's pid, host and start time. It is
removed when the process exits; a lock left by a process that died (a SIGKILL, a power cut) is stale: a new run on
the same host sees that its pid is gone and takes it over with a warning. A lock from another host cannot be checked
and is refused with the command that removes it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import time
from pathlib import Path

from ldm.errors import UserError

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def _holder(path: Path) -> dict | None:
    """The lock's content, or None if it vanished or is unreadable (a crash mid-write)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {started}"


def acquire_output_lock(output_dir: str | Path) -> Path:
    """Take the lock of ``output_dir`` for this process (re-entrant within one process); returns its path.

    Raises:
        UserError: another live run holds it, naming that run and what to do.
    """
    path = Path(output_dir) / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    for _ in range(3):  # a lock that vanishes between our attempts is simply tried again
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            fd = None
        if fd is None:
            if _held_by(path, me, output_dir):
                return path
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(me, file)
        atexit.register(release_output_lock, path)
        return path
    raise UserError(f"could not take the lock {path}: other runs keep replacing it; pass another --output-dir")


def _held_by(path: Path, me: dict, output_dir: str | Path) -> bool:
    """Whether the existing lock ``path`` is this process's own; False if it is stale (to be taken over).

    Raises:
        UserError: a live run, or one on another host, holds it.
    """
    holder = _holder(path)
    if holder is None:
        logger.warning("taking over the unreadable lock %s", path)
        return False
    if holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
        return True  # an earlier run in this same process
    if holder.get("host") != me["host"]:
        raise UserError(
            f"--output-dir {output_dir} is locked by a run on another machine ({_describe(holder)}); wait for it to "
            f"finish or pass another --output-dir (if that run is gone, remove {path})"
        )
    if _alive(int(holder.get("pid", -1))):
        raise UserError(
            f"another run ({_describe(holder)}) is writing to --output-dir {output_dir}; wait for it to finish or "
            "pass another --output-dir"
        )
    logger.warning("taking over the stale lock of %s, which is no longer running", _describe(holder))
    return False


def release_output_lock(path: Path) -> None:
    """Remove the lock (``path``, or the lock of the folder ``path``) if this process holds it."""
    path = path / LOCK_NAME if path.is_dir() else path
    holder = _holder(path)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
