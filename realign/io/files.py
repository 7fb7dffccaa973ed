"""Input files checked before they are opened, and OS errors said as what they are.

Every file realign reads goes through `require_file` first: a FIFO, socket or device in place of
a model, adapter or prompt file would block a read forever or yield garbage, so anything that is
not a regular file (after following symlinks) is refused, and a missing file, a directory, a
symlink loop and a permission problem each get their own message instead of a misleading one
("truncated", "does not exist").
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import RealignError

_REASONS = {
    errno.ENOENT: "does not exist",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ELOOP: "is a symlink loop",
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "a component of the path is not a directory",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on device",
    errno.EEXIST: "already exists",
}
if hasattr(errno, "EDQUOT"):
    _REASONS[errno.EDQUOT] = "disk quota exceeded"


def os_reason(exc: OSError) -> str:
    """What an OSError means, in a few words (its errno, not the exception text)."""
    reason = _REASONS.get(exc.errno) if exc.errno is not None else None
    return reason or (exc.strerror or str(exc) or type(exc).__name__).lower()


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def require_file(path: str | Path, what: str) -> Path:
    """`path` (symlinks followed) is a readable regular file; one clear error otherwise. Checked
    with stat, before any open: opening a FIFO blocks."""
    path = Path(path).expanduser()
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise RealignError(f"{what} '{path}' {_stat_reason(exc)}") from None
    if stat.S_ISDIR(mode):
        raise RealignError(f"{what} '{path}' is a directory; expected a file")
    if not stat.S_ISREG(mode):
        raise RealignError(f"{what} '{path}' is {_kind(mode)}; expected a regular file")
    if not os.access(path, os.R_OK):
        raise RealignError(f"{what} '{path}' cannot be read: permission denied")
    return path


def _stat_reason(exc: OSError) -> str:
    if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.ENAMETOOLONG):
        return os_reason(exc)
    return f"cannot be read: {os_reason(exc)}"


def require_regular_entries(directory: Path, what: str) -> None:
    """Every entry of a model or adapter directory that is not a directory is a regular file
    (symlinks followed): transformers and tokenizers open files of their own choosing, and a FIFO
    among them would block the load forever."""
    try:
        entries = list(os.scandir(directory))
    except OSError as exc:
        raise RealignError(f"{what} '{directory}' cannot be listed: {os_reason(exc)}") from None
    for entry in entries:
        try:
            mode = os.stat(entry.path).st_mode
        except OSError:  # a dangling link or a loop: said by require_file if it is ever read
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise RealignError(f"{what} '{directory}': '{entry.name}' is {_kind(mode)}; expected a regular file")


def member_path(directory: Path, name: object, what: str) -> Path:
    """The path of a file that a directory's own index names (a shard of a sharded checkpoint): a plain file
    name in `directory`, never an absolute path, a path with a separator or `..`, so that
    nothing realign reads or writes by that name can be outside the directory (a patched copy
    writes `OUT/<name>`; an entry '/x' or '../FT/x' would write into an input). The file may be a
    symlink, as every file of a Hugging Face cache snapshot is: it is only read. Not checked
    for existence (see `require_file`)."""
    if not isinstance(name, str) or not name or name in (".", "..") or "\x00" in name:
        raise RealignError(f"{what} names {name!r}, which is not a file name")
    if PurePosixPath(name).name != name or PureWindowsPath(name).name != name:
        raise RealignError(f"{what} names '{name}', which is not a plain file name in its own directory "
                           "(absolute paths, '..' and subdirectories are refused)")
    return directory / name
