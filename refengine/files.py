"""Output files written whole or not at all, never through a planted link, with a new file's usual mode.

    with atomic_output(Path("out.npy")) as fh:
        np.save(fh, array)            # out.npy appears (or is replaced) only if this block completes

The data goes into an unnamed file in the target's folder (Linux's O_TMPFILE), created by the kernel
for this process alone: nothing in the folder can redirect the writes, and a process killed by
SIGKILL leaves nothing behind. At the end the file gets a name, then the target's, in one rename.
Where the filesystem has no O_TMPFILE, a file created with O_EXCL under a name that carries our pid
(`.out.npy.<pid>.<random>.partial`) is used instead; such files left by dead processes are removed
the next time anything is written to the same target.

Files get the permissions `open(path, "w")` would give them: the target's own when it is replaced,
0666 less the umask when it is new (mkstemp alone would leave them 0600).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from refengine.errors import RefengineError

PARTIAL_SUFFIX = ".partial"


class OutputError(RefengineError):
    """An output file that cannot be written: the message names it and says why."""


def partial_name(target: Path) -> str:
    """The name of a temporary file for `target`, which says whose it is: `.NAME.PID.RANDOM.partial`."""
    return f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"


def _partial_owner(name: str, target_name: str) -> int | None:
    """The pid in a partial file's name for `target_name` (`.NAME.PID.RANDOM.partial`, or `NAME.PID.partial`
    as refengine's model cache once named them), or None if the name is not one of these."""
    if not name.endswith(PARTIAL_SUFFIX):
        return None
    stem = name[: -len(PARTIAL_SUFFIX)]
    if stem.startswith(f".{target_name}."):
        pid, _, token = stem[len(target_name) + 2 :].partition(".")
        if not re.fullmatch(r"[0-9a-f]{8}", token):
            return None
    elif stem.startswith(f"{target_name}."):
        pid = stem[len(target_name) + 1 :]
    else:
        return None
    return int(pid) if pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_partials(folder: Path, target_name: str) -> list[Path]:
    """Remove the partial files of `target_name` in `folder` whose process is gone; return them."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        pid = _partial_owner(name, target_name)
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        path = folder / name
        with contextlib.suppress(OSError):  # raced with another cleaner, or not ours to remove
            if not stat.S_ISDIR(path.lstat().st_mode):
                path.unlink()
                removed.append(path)
    return removed


def _umask() -> int:
    """The process's umask (read without changing it, from /proc, where possible)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # briefly changed: only where /proc is missing
    os.umask(mask)
    return mask


def new_file_mode(target: Path) -> int:
    """What `open(target, "w")` would leave: the existing file's mode, or 0666 less the umask."""
    try:
        st = target.stat()
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    except OSError:
        pass
    return 0o666 & ~_umask()


def _describe(e: OSError) -> str:
    return e.strerror or str(e)


def _write_failure(fh: BinaryIO, e: OSError) -> str:
    """Why a write failed. numpy reports a short write without errno ("131072 requested and 16352
    written"); one more byte then fails with the reason itself (no space left, file too large)."""
    if e.errno is not None:
        return _describe(e)
    try:
        os.write(fh.fileno(), b"\0")
    except OSError as probe:
        return f"{_describe(probe)} ({e})"
    return str(e)


def _create(folder: Path, target: Path, mode: int) -> tuple[int, Path | None]:
    """An open file descriptor for the new content, and its name (None: unnamed, O_TMPFILE)."""
    if hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd"):
        try:
            return os.open(folder, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, mode), None
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
    named = folder / partial_name(target)
    # O_EXCL with O_NOFOLLOW: a file planted under this name, or a link, makes this fail, not write through it
    fd = os.open(named, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, mode)
    return fd, named


def _publish(fd: int, named: Path | None, target: Path, replace: bool) -> None:
    """Give the written file the target's name: replacing what is there, or (replace=False) only if nothing is."""
    if named is None:
        named = target.parent / partial_name(target)
        folder = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # linkat(AT_SYMLINK_FOLLOW) names the unnamed file; a dir fd makes Python call linkat, not link,
            # which would try to link /proc's symlink itself (EXDEV)
            os.link(f"/proc/self/fd/{fd}", named.name, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=True)
        finally:
            os.close(folder)
    try:
        if replace:
            os.replace(named, target)
        else:
            os.link(named, target, follow_symlinks=False)  # FileExistsError if another process made it first
    finally:
        with contextlib.suppress(FileNotFoundError):
            named.unlink()


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike, replace: bool = True) -> Iterator[BinaryIO]:
    """Write `target` whole or not at all (see the module docstring).

    replace=False leaves an existing target alone and raises FileExistsError, for a caller that may
    race another process creating the same file. Failing to create or write the file (no such
    folder, no space left, a read-only filesystem) is an OutputError naming the target.
    """
    target = Path(target)
    folder = target.parent
    if not folder.is_dir():
        raise OutputError(f"{target}: folder {folder} does not exist")
    with contextlib.suppress(OSError):
        if not stat.S_ISREG(target.lstat().st_mode) and not target.is_symlink():
            # a rename would replace the device, FIFO or folder itself, not write into it
            raise OutputError(f"{target}: not a regular file; refusing to replace it")
    remove_stale_partials(folder, target.name)
    try:
        fd, named = _create(folder, target, new_file_mode(target))
    except OSError as e:
        raise OutputError(f"{target}: cannot create it: {_describe(e)}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            try:
                yield fh
                fh.flush()
            except OSError as e:
                if e.filename is not None:  # about some other file the caller opened: theirs to report
                    raise
                raise OutputError(f"{target}: cannot write: {_write_failure(fh, e)}") from None
            try:
                _publish(fh.fileno(), named, target, replace)
            except FileExistsError:
                if replace:
                    raise OutputError(f"{target}: cannot write: a temporary name was taken") from None
                raise
            except OSError as e:
                raise OutputError(f"{target}: cannot write: {_describe(e)}") from None
            named = None
    finally:
        if named is not None:
            with contextlib.suppress(OSError):
                named.unlink()
