"""Crash-safe file operations: atomic writes, published folders, stale temporaries, run dirs.

Every file kdkit writes goes through here (the one exception, ``metrics.jsonl``, is appended
in place and cut back to the lines its checkpoint has seen on resume), so that "a crash
never leaves a torn file" holds by construction:

- :func:`atomic_write_bytes` writes a temporary file in the same folder, fsyncs it, renames
  it over the target and fsyncs the folder: after a crash (or a power cut) the target holds
  either the old or the new bytes.
- :func:`temp_dir` + :func:`publish_dir` build a folder under a temporary name and rename it
  into place once complete; a folder that is already published is never replaced (the
  loser of a race discards its own copy).
- Temporaries are named ``.<name>.<host>-<pid>.<random>.tmp``, so a later run can tell a
  temporary left by a killed process (its pid is gone) from one being written right now
  (:func:`clean_stale_temps`).
- Files and folders get the permissions the user's umask gives (``mkstemp`` alone would
  make them 0600/0700 and unreadable to colleagues sharing a results folder or a cache).
- :func:`mark_run_dir` / :func:`remove_run_dir`: ``--force`` deletes only a folder that
  kdkit created (it holds :data:`RUN_MARKER`); marking a run folder (every run and resume
  does, first) deletes the temporaries killed processes left in it.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

from kdkit.errors import KdkitError

RUN_MARKER = ".kdkit-run"
def _host_tag() -> str:
    """This machine and PID namespace: containers sharing a hostname and a folder each see
    only their own pids, so a pid is only judged where it lives."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"
    try:
        return f"{host}_{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return host


_HOST = _host_tag()
_TEMP_RE = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[^.]+\.tmp$")
STALE_FOREIGN_S = 24 * 3600.0  # a temporary of another host is stale after a day
_umask: int | None = None


def umask() -> int:
    """The process umask (read once; ``os.umask`` can only be read by setting it)."""
    global _umask
    if _umask is None:
        _umask = os.umask(0o022)
        os.umask(_umask)
    return _umask


def _temp_prefix(name: str) -> str:
    return f".{name}.{_HOST}-{os.getpid()}."


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in ``folder`` durable (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sync_file(path: Path) -> None:
    """fsync ``path`` and give it the umask's mode (writers such as safetensors make 0600)."""
    os.chmod(path, 0o666 & ~umask())
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def temp_file(target: Path) -> Path:
    """A new empty temporary file beside ``target`` (mode from the umask)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=_temp_prefix(target.name), suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~umask())
    return Path(tmp)


def commit_file(tmp: Path, target: Path) -> None:
    """fsync ``tmp``, rename it over ``target`` and fsync the folder (mode from the umask)."""
    sync_file(tmp)
    os.replace(tmp, target)
    fsync_dir(target.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (temporary file, fsync, rename)."""
    tmp = temp_file(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        commit_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` so that ``dst`` is either absent/old or the complete copy."""
    tmp = temp_file(dst)
    try:
        shutil.copyfile(src, tmp)
        commit_file(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def temp_dir(target: Path) -> Path:
    """A new empty temporary folder beside ``target``, to be published with :func:`publish_dir`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=_temp_prefix(target.name),
                                suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def publish_dir(tmp: Path, target: Path) -> bool:
    """Rename the complete folder ``tmp`` to ``target``; never replaces a published one.

    Returns False (and deletes ``tmp``) when ``target`` already exists: another process
    published it first, and readers may be using it.
    """
    for f in tmp.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(tmp)
    try:
        os.rename(tmp, target)  # fails if target exists and is not empty
    except OSError:
        if not target.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    fsync_dir(target.parent)
    return True


def discard_dir(folder: Path) -> None:
    """Remove a published ``folder`` safely: rename it to a temporary name first (atomic;
    readers holding its files open keep working, and no reader finds it half-deleted), then
    delete that. A missing folder is fine."""
    if folder.is_symlink() or (os.path.lexists(folder) and not folder.is_dir()):
        folder.unlink(missing_ok=True)
        return
    if not folder.exists():
        return
    aside = temp_dir(folder)  # an empty placeholder with a temporary's name
    try:
        os.rename(folder, aside)  # a folder may replace an empty one
    except FileNotFoundError:  # another process removed it first
        aside.rmdir()
        return
    except OSError:
        aside.rmdir()
        raise
    fsync_dir(folder.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale_temp(path: Path, now: float | None = None) -> bool:
    """True for a kdkit temporary whose writer is gone (dead pid here, or a day old elsewhere)."""
    m = _TEMP_RE.match(path.name)
    if m is None:
        return False
    if m["host"] == _HOST:
        return int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"]))
    try:
        age = (now or time.time()) - path.lstat().st_mtime
    except OSError:
        return False
    return age > STALE_FOREIGN_S


def clean_stale_temps(folder: Path) -> int:
    """Delete temporaries in ``folder`` left by killed processes; return how many."""
    removed = 0
    try:
        entries = list(folder.iterdir())
    except OSError:
        return 0
    for p in entries:
        if not is_stale_temp(p):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def mark_run_dir(path: Path) -> None:
    """Create ``path`` (if needed) as a kdkit run directory: ``--force`` may remove it later.

    Temporaries that killed processes left in it are deleted: every run (and resume)
    marks its folder first, so none outlives the next run there.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(path)
        marker = path / RUN_MARKER
        if not marker.exists():
            if any(path.iterdir()):  # somebody else's folder: never adopt it
                raise KdkitError(f"{path} exists and was not created by kdkit (no {RUN_MARKER} "
                                 "marker); kdkit will not write into it: choose another --out")
            atomic_write_bytes(marker, b"created by kdkit; --force may delete this folder\n")
    except (NotADirectoryError, FileExistsError):
        raise KdkitError(f"cannot create run directory {path}: a file stands in its place or "
                         "in its path; choose another --out") from None
    except OSError as e:
        raise KdkitError(f"cannot create run directory {path}: {e.strerror}; choose another "
                         "--out") from None


def remove_run_dir(path: Path) -> None:
    """Delete a run directory for ``--force``: only one kdkit created, never anything else.

    The folder is renamed to a temporary name first, then deleted: a kill midway leaves a
    temporary that the next run removes, never a half-deleted run without its marker.
    """
    if path.is_symlink():
        raise KdkitError(f"--force refuses to delete {path}: it is a symbolic link; remove the "
                         "link yourself or choose another --out")
    resolved = path.resolve()
    if not (resolved / RUN_MARKER).is_file():
        raise KdkitError(
            f"--force refuses to delete {path}: it was not created by kdkit (no {RUN_MARKER} "
            "marker inside); delete it yourself or choose another --out"
        )
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved == Path(resolved.anchor):
        raise KdkitError(f"--force refuses to delete {path}: it holds the current directory")
    discard_dir(resolved)
