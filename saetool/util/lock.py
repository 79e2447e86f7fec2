"""One writer per output folder: a lock file beside it, for `saetool generate` and `saetool sweep`.

Two runs writing one folder would interleave their files (the later sweep's members replace the earlier's, both
print "saved", train_log.jsonl mixes both). The lock is `<parent>/.<name>.lock`, created with O_EXCL (atomic on
local and NFSv3+ file systems) and holding JSON {"pid", "host", "started", "command"} of its owner. It sits beside
the folder so that it can be taken before the folder exists (a run refused for bad input leaves nothing) and
survives the store being renamed into place. A lock whose owner is dead (same host, pid gone: a SIGKILLed run)
is stale and taken over; a lock of another host cannot be checked and is refused with its path, to delete by
hand if that run is gone. The same checks give one-line errors for an output path that is a regular file or a
parent folder that cannot be written (read-only, full).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def lock_path(folder: str | os.PathLike) -> Path:
    """The lock file of `folder`: <parent>/.<name>.lock."""
    folder = Path(folder).absolute()
    return folder.parent / f".{folder.name}.lock"


@contextlib.contextmanager
def writer_lock(folder: str | os.PathLike, flag: str, dist=None) -> Iterator[None]:
    """Hold the lock of `folder` while the block runs (then remove it, also on errors).

    flag: the CLI flag naming the folder, for messages (e.g. "output_dir"). dist: a saetool.util.distributed.Dist;
    rank 0 takes the lock and every rank learns the outcome, so all ranks stop together.
    Raises ValueError (one line) if the path is a regular file, its parent cannot be written, or another live
    run holds the lock."""
    main = dist is None or dist.is_main
    error, taken = None, None
    if main:
        try:
            taken = _acquire(Path(folder), flag)
        except ValueError as e:
            error = str(e)
    if dist is not None:
        error = dist.broadcast_object(error)
    if error:
        raise ValueError(error)
    try:
        yield
    finally:
        if taken is not None:
            taken.unlink(missing_ok=True)


def lock_owner(folder: str | os.PathLike) -> dict | None:
    """The owner record {"pid", "host", "started", "command"} of `folder`'s lock (None: no lock, or unreadable).
    Under `writer_lock(folder, flag, dist)` every rank reads rank 0's record: it names the run."""
    try:
        owner = json.loads(lock_path(folder).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def owner_gone(folder: str | os.PathLike, owner: dict | None) -> str | None:
    """None while the run `owner` (a `lock_owner` record) still holds `folder`'s lock; else one line saying why
    it does not: the lock was released or taken by another run, or its process (on this host) is dead. Other
    ranks poll this instead of waiting in a collective for rank 0 (saetool.generate)."""
    now = lock_owner(folder)
    who = "the run" if not owner else f"rank 0 (pid {owner.get('pid')} on {owner.get('host')})"
    if now is None or now != owner:
        return f"{who} no longer holds the lock {lock_path(folder)}: it stopped (its error is in its own output)"
    if owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", -1))):
        return f"{who} is dead (killed?) while holding the lock {lock_path(folder)}"
    return None


def _acquire(folder: Path, flag: str) -> Path:
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--{flag} {folder} is a file, not a folder; choose another path")
    path = lock_path(folder)
    if folder.is_dir():  # an existing folder must be writable too (the lock only proves its parent is)
        probe = folder / f".saetool-write-test-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ValueError(f"--{flag} {folder} cannot be written: {_reason(e)}") from None
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
             "command": " ".join(sys.argv)[:500],
             "nonce": os.urandom(8).hex()}  # each taking of the lock is its own owner (same pid within one second)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # the second try follows the removal of a stale lock
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                _refuse_or_clear(path, folder, flag)
                continue
            try:
                os.write(fd, json.dumps(owner).encode())
            except OSError:
                os.close(fd)
                path.unlink(missing_ok=True)
                raise
            os.close(fd)
            return path
        raise ValueError(f"--{flag} {folder}: could not take its lock {path}")
    except OSError as e:
        raise ValueError(f"--{flag} {folder} cannot be written: {_reason(e)} (its lock {path})") from None


def _reason(e: OSError) -> str:
    return {errno.ENOSPC: "the disk is full", errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
            errno.EDQUOT: "disk quota exceeded"}.get(e.errno, e.strerror or type(e).__name__)


def _refuse_or_clear(path: Path, folder: Path, flag: str) -> None:
    """Remove the lock at `path` if its owner is a dead process of this host; else ValueError naming the owner."""
    try:
        owner = json.loads(path.read_text())
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        if time.time() - path.stat().st_mtime < 10:  # being written right now by its owner
            raise ValueError(f"--{flag} {folder} is being written by another run (lock {path})") from None
        path.unlink(missing_ok=True)  # an unreadable lock older than that: its writer died mid-write
        return
    if host == socket.gethostname() and not _alive(pid):
        path.unlink(missing_ok=True)
        return
    raise ValueError(f"--{flag} {folder} is being written by another run (pid {pid} on {host}, started "
                     f"{owner.get('started', '?')}); wait for it or choose another folder (if that run is gone, "
                     f"delete {path})")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
