"""One run per folder: an advisory lock on ``OUT/.lock`` held for the life of a run.

Two runs writing one folder would resume each other's checkpoints and interleave their logs. The lock is
an ``flock`` on a file in the run folder: the kernel releases it when the holding process ends, however it
ends (kill -9 included), so a stale lock never blocks a new run (forked loader workers close their copy
of it). The file records who holds it, for the
error the second run prints. Under torchrun, rank 0 takes the lock and every rank gets its answer.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

from mimkit.distributed import DistEnv, broadcast_object

try:
    import fcntl
except ImportError:  # not on Windows: runs there are not locked
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
_HELD: set[int] = set()  # descriptors of the locks this process holds


def _drop_inherited_locks() -> None:
    """In a forked child (a loader worker): let go of the inherited lock. An flock belongs to the open
    file, which a fork shares, so a worker outliving a killed run would otherwise keep it. The descriptor
    is pointed at /dev/null rather than closed, so the child's copy of the file object stays harmless."""
    if not _HELD:
        return
    null = os.open(os.devnull, os.O_RDONLY)
    for fd in _HELD:
        os.dup2(null, fd)
    os.close(null)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


class RunFolderError(RuntimeError):
    """The run folder cannot be used: another process holds its lock, or it cannot be written."""


class RunLock:
    """``with RunLock(out, env):`` holds ``out/.lock`` (creating ``out``), else :class:`RunFolderError`."""

    def __init__(self, folder: str | Path, env: DistEnv | None = None) -> None:
        self.folder, self.env = Path(folder), env
        self._file = None
        self._made_folder = self._made_lock = False

    def acquire(self) -> None:
        error = None
        if self.env is None or self.env.is_main:
            error = self._acquire_here()
        if self.env is not None:
            error = broadcast_object(error, self.env)
        if error is not None:
            raise RunFolderError(error)

    def _acquire_here(self) -> str | None:
        """None when the lock is ours, else the message that says who holds it."""
        try:
            self._made_folder = self._made_folder or not self.folder.exists()  # kept across a retry
            self.folder.mkdir(parents=True, exist_ok=True)
            self._made_lock = not (self.folder / LOCK_NAME).exists()
            handle = open(self.folder / LOCK_NAME, "a+", encoding="utf-8")  # noqa: SIM115
        except OSError as err:
            return f"cannot use run folder '{self.folder}': {err.strerror or err}"
        if fcntl is None:
            self._file = handle
            return None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            return (
                f"run folder '{self.folder}' is in use by another run ({describe(holder)}); wait for it to "
                "end, or give this run another output folder"
            )
        except OSError as err:  # a file system without locks (some network mounts): run, but say so
            print(
                f"warning: cannot lock run folder '{self.folder}' ({err.strerror or err}); a second run "
                "started on it would not be stopped",
                file=sys.stderr,
            )
            self._file = handle
            return None
        try:  # the file locked must still be the folder's: a run ending meanwhile removes its lock file
            same = os.fstat(handle.fileno()).st_ino == os.stat(self.folder / LOCK_NAME).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            handle.close()
            return self._acquire_here()
        handle.seek(0)
        handle.truncate()
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        self._file = handle
        _HELD.add(handle.fileno())
        return None

    def release(self) -> None:
        if self._file is not None:
            self._drop_if_unused()
            _HELD.discard(self._file.fileno())
            if fcntl is not None:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def _drop_if_unused(self) -> None:
        """The lock file goes with the run that made it (removed while still held), and a folder this
        run made goes too if it is left empty: a run that failed to start leaves nothing behind."""
        try:
            if self._made_lock:
                (self.folder / LOCK_NAME).unlink()
            if self._made_folder and not any(self.folder.iterdir()):
                self.folder.rmdir()
        except OSError:  # removed by hand meanwhile, or a read-only folder: nothing to tidy
            pass

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return f"pid {info['pid']} on {info['host']} since {info['since']}: {info['command']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
