"""Writing files so that a crash never leaves a half-written one behind, and so that nothing but
minideep's own leftovers is ever removed.

  write_output   every file a command writes on request (--json, --html): `-` and the process's
                 own stdout print; devices, FIFOs and sockets are written through; a symlink
                 keeps its link and its target is replaced; a regular file is replaced atomically
  atomic_file    the temporary-file-then-rename write behind it (and behind checkpoints)
  temp_name      the one name pattern of minideep's temporaries: `.NAME.minideep-PID-HEX.tmp`
  remove_stale_temps  deletes only names of that pattern, for files the caller writes, whose
                 process is dead, and only where the caller knows the folder is minideep's
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import stat
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional

from .errors import UserError

STDOUT = "-"  # an output path that means standard output

# The temporaries minideep's writers name: a marker no person types, the writer's PID, 8 hex digits.
_TEMP = re.compile(r"\.(?P<name>.+)\.minideep-(?P<pid>[0-9]+)-[0-9a-f]{8}\.(?:tmp|old)")
# Those of earlier versions (`.NAME.PID.HEX.tmp`). Both count only for a NAME the caller writes.
_LEGACY = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)\.[0-9a-f]{8}\.(?:tmp|old)")


def prints_to_stdout(path: Path) -> bool:
    """`-`, or a path naming the very file this process's stdout writes to (/dev/stdout, /dev/fd/1)."""
    if str(path) == STDOUT:
        return True
    try:
        return os.path.samestat(os.stat(path), os.fstat(sys.stdout.fileno()))
    except (OSError, ValueError, AttributeError):  # no such file, or stdout is not a real file
        return False


def _write_through(path: Path) -> bool:
    """An existing file that is not a regular file (a device, a FIFO, a socket): written into as
    it is, never replaced; the symlinks to one included."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode) and not path.is_dir()
    except OSError:
        return False


def writable(path: str | os.PathLike) -> Path:
    """path, if a file can be written there; checked before a long computation, so a wrong path
    fails first, not last. Accepts what write_output accepts: `-`, devices, symlinks."""
    path = Path(path)
    if prints_to_stdout(path):
        return path
    if _write_through(path):
        if not os.access(path, os.W_OK):
            raise UserError(f"cannot write {path}: permission denied")
        return path
    target = path.resolve() if path.is_symlink() else path  # a link's target is what gets replaced
    if not target.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {target.parent} does not exist")
    if target.is_dir():
        raise UserError(f"cannot write {path}: it is a folder")
    probe = temp_name(target)  # the file a write creates first (permissions, read-only disks)
    try:
        probe.open("xb").close()
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}")
    return path


def write_output(path: str | os.PathLike, data: bytes | str) -> None:
    """Write bytes, or text as UTF-8, where an output option points: see the module's docstring.
    A failure (a full disk, /dev/full) is one UserError naming path; a replaced file is left as
    it was."""
    path = writable(path)
    data = data.encode("utf-8") if isinstance(data, str) else data
    try:
        if prints_to_stdout(path):
            sys.stdout.flush()
            out = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else None
            if out is None:
                sys.stdout.write(data.decode("utf-8"))
            else:
                out.write(data)
            sys.stdout.flush()
        elif _write_through(path):
            with open(path, "wb") as f:
                f.write(data)
        else:
            target = path.resolve() if path.is_symlink() else path
            with atomic_file(target) as f:
                f.write(data)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}")


def write_file(path: str | os.PathLike, data: bytes | str) -> None:
    """Write bytes, or text as UTF-8, atomically (see atomic_file): the files minideep keeps in
    its own folders (data dirs, run dirs)."""
    with atomic_file(writable(path)) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def temp_name(path: Path, suffix: str = ".tmp") -> Path:
    """A fresh hidden name beside path (for a file or folder to be renamed over it)."""
    return path.with_name(f".{path.name}.minideep-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def temp_dir(path: Path, suffix: str = ".tmp") -> Path:
    """Create an empty folder beside path with the permissions of any new folder (the umask
    applies; tempfile.mkdtemp's would be owner-only, and the folder is renamed into place)."""
    tmp = temp_name(path, suffix)
    tmp.mkdir(0o777)
    return tmp


def stale_temp(name: str, own: Callable[[str], bool]) -> bool:
    """name is a temporary that minideep's writer made for a file own(NAME) says the caller
    writes, and its process is gone (a kill -9 left it). Besides the current pattern, the
    `.NAME.PID.HEX.tmp` names of earlier versions."""
    m = _TEMP.fullmatch(name) or _LEGACY.fullmatch(name)
    return m is not None and own(m["name"]) and not _alive(int(m["pid"]))


def remove_stale_temps(folder: Path, own: Callable[[str], bool]) -> int:
    """Delete minideep's temporaries (files or folders) in folder for the names own() accepts
    whose writing process is gone; the caller has checked that folder is one of minideep's (a
    run dir, a data dir), or own() names only the one file it is about to write. Returns how
    many were removed."""
    removed = 0
    for p in folder.iterdir() if folder.is_dir() else ():
        if not stale_temp(p.name, own):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed += 1
    return removed


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
    file gets the permissions of any new file (the umask applies; not mkstemp's owner-only), or
    those of the regular file it replaces."""
    path = Path(path)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        mode = _regular_mode(path)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _regular_mode(path: Path) -> Optional[int]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else None


LOCK = ".minideep.lock"  # in a folder one process at a time may write (a run dir)


def lock_folder(folder: Path, what: str = "minideep") -> BinaryIO:
    """Hold folder's lock for as long as the returned file stays open: an exclusive flock on
    folder/.minideep.lock, which holds the holder's PID. The kernel releases it when the process
    ends, kill -9 included, so it is never left stuck. Raises UserError naming the PID that holds
    it. Creates folder."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / LOCK, "a+b")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read(20).decode("ascii", errors="replace").strip()
        f.close()
        who = f"{what} (PID {pid})" if pid.isdigit() else f"another {what} process"
        raise UserError(f"{folder} is in use: {who} is writing it; wait for it to end, or stop it first")
    try:
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()).encode("ascii"))
        f.flush()
    except OSError:  # a full disk: the PID is only for the message; the lock holds all the same
        pass
    return f


def sha256_file(path: str | os.PathLike) -> str:
    """A file's content fingerprint, read in 1 MiB pieces: an edit that keeps its size changes it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
