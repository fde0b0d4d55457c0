"""Writing files so that a crash never leaves a half-written one behind."""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import UserError


def writable(path: str | os.PathLike) -> Path:
    """path, if a file can be written there (its folder exists and it is not a folder itself);
    checked before a long computation, so a wrong path fails first, not last."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder")
    probe = temp_name(path)  # the file a write creates first (permissions, read-only disks)
    try:
        probe.open("xb").close()
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}")
    return path


def temp_name(path: Path, suffix: str = ".tmp") -> Path:
    """A fresh hidden name beside path (for a file or folder to be renamed over it)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


def temp_dir(path: Path, suffix: str = ".tmp") -> Path:
    """Create an empty folder beside path with the permissions of any new folder (the umask
    applies; tempfile.mkdtemp's would be owner-only, and the folder is renamed into place)."""
    tmp = temp_name(path, suffix)
    tmp.mkdir(0o777)
    return tmp


def remove_stale_temps(folder: Path) -> None:
    """Delete the temporary files (named by temp_name) in folder whose writing process is gone:
    what a kill -9 during a write leaves behind."""
    for p in folder.glob(".*.tmp"):
        parts = p.name.split(".")  # "", name..., pid, hex, "tmp"
        if len(parts) >= 5 and parts[-3].isdigit() and not _alive(int(parts[-3])) and p.is_file():
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:  # another user's process
        return True
    except (OSError, OverflowError):  # no such process
        return False
    return True


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary file in path's folder; on success flush, fsync and rename it over `path`,
    on failure delete it. Readers see the old file or the complete new one, never a part. The
    file gets the permissions of any new file (the umask applies; not mkstemp's owner-only)."""
    path = Path(path)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_file(path: str | os.PathLike, data: bytes | str) -> None:
    """Write bytes, or text as UTF-8, atomically (see atomic_file)."""
    with atomic_file(writable(path)) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
