"""Atomic output: write into a staging sibling, then rename into place.

A failed or interrupted run leaves nothing at the target; an existing target is replaced only
with force, and never when it is (or holds, or sits inside) one of the inputs. Everything that can
be known about the target before the work is checked then (`check_target`: where it is, that it
can be written, that its staging name fits); the rename at the end replaces only what was checked
(`put_in_place`): a directory that appeared meanwhile, or a second run to the same target that
finished first, is never clobbered. Staging siblings carry the pid of their writer and a tag of
its machine (`.NAME.PID.MACHINE-XXXXXXXX.partial`), so that the next run on that machine removes
those a killed run left behind.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import os
import re
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import RealignError
from .files import os_reason

STAGING_SUFFIX = ".partial"
_RANDOM = 8  # characters tempfile adds to a name
_NAME_MAX = 255


@dataclass(frozen=True)
class Checked:
    """A target as `check_target` found it: its resolved path and the identity (device, inode,
    ctime: an inode number is reused at once) of what was there, None when nothing was: what a
    forced run may replace at the end."""

    path: Path
    identity: tuple[int, int, int] | None


def _related(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def overlaps(a: Path, b: Path) -> bool:
    """`a` and `b` are the same path, or one holds the other."""
    return _related(Path(a).expanduser().resolve(), Path(b).expanduser().resolve())


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # nothing there (under a file: said by _check_writable)
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def check_target(target: Path, force: bool, inputs: list[Path], what: str = "output", kind: str = "directory") -> Checked:
    """Check, before any work, that `target` may be written: it overlaps no input, exists only
    with `force` (and is not a directory where a file goes), sits under a directory, not a file,
    can be written there, and its staging name fits the file system."""
    try:
        resolved = Path(target).expanduser().resolve()
        for source in inputs:
            if _related(resolved, Path(source).expanduser().resolve()):
                raise RealignError(f"{what} '{target}' overlaps the input '{source}'; inputs are never modified")
        identity = _identity(resolved)
    except OSError as exc:  # a permission problem on the way
        raise RealignError(f"{what} '{target}': {os_reason(exc)}") from None
    except RuntimeError:  # Path.resolve before Python 3.13
        raise RealignError(f"{what} '{target}': a symlink loop on the way") from None
    if identity is not None and not force:
        raise RealignError(f"{what} '{target}' already exists (use --force to replace it)")
    if identity is not None and kind == "file" and resolved.is_dir():
        raise RealignError(f"{what} '{target}' is a directory; expected a file name")
    _check_writable(Path(target), resolved, what)
    return Checked(resolved, identity)


@functools.lru_cache(maxsize=None)
def _machine() -> str:
    """Six hex digits naming this host and pid namespace: a pid means something only there (two
    containers writing to one volume must not judge each other's pids)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except (OSError, AttributeError):
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}|{namespace}".encode()).hexdigest()[:6]


def staging_prefix(name: str, pid: int | None = None) -> str:
    """How the staging siblings of `name` that process `pid` (default: this one) writes begin."""
    return f".{name}.{os.getpid() if pid is None else pid}.{_machine()}-"


def _check_writable(target: Path, resolved: Path, what: str) -> None:
    ancestor = next(p for p in resolved.parents if os.path.lexists(p))
    if not ancestor.is_dir():
        raise RealignError(f"{what} '{target}' cannot be created: '{ancestor}' is a file, not a directory")
    try:
        name_max = os.pathconf(ancestor, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = _NAME_MAX
    staged = len(os.fsencode(staging_prefix(resolved.name))) + _RANDOM + len(STAGING_SUFFIX)
    if staged > name_max:
        raise RealignError(f"{what} '{target}': the name is too long ({len(os.fsencode(resolved.name))} bytes; realign "
                           f"stages it under a name {staged - len(os.fsencode(resolved.name))} bytes longer and the "
                           f"file system allows {name_max})")
    missing = [p.name for p in [resolved, *resolved.parents] if p != ancestor and ancestor in p.parents]
    if any(len(os.fsencode(part)) > name_max for part in missing):
        raise RealignError(f"{what} '{target}': a directory name on the way is longer than {name_max} bytes")
    try:  # what the OS says beats guessing from permission bits (root, read-only mounts, ACLs)
        os.rmdir(tempfile.mkdtemp(prefix=".realign-probe.", dir=ancestor))
    except OSError as exc:
        raise RealignError(f"{what} '{target}' cannot be written: {os_reason(exc)} ('{ancestor}')") from None


# -- staging siblings -------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def clean_stale(target: Path) -> list[Path]:
    """Remove the staging siblings of `target` whose writer process is gone (a run killed with
    -9 or a power cut), say so on stderr, and return them. Only realign's own names
    (`.NAME.PID.MACHINE-XXXXXXXX.partial`) written on this machine, never another live run's."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.{_machine()}-[a-z0-9_]{{{_RANDOM}}}{re.escape(STAGING_SUFFIX)}$")
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or int(match[1]) == os.getpid() or _alive(int(match[1])):
            continue
        path = Path(entry.path)
        try:
            shutil.rmtree(path) if entry.is_dir(follow_symlinks=False) else path.unlink()
        except OSError:
            continue
        removed.append(path)
        print(f"realign: note: removed '{path}', left by an interrupted run (process {match[1]} is gone)", file=sys.stderr)
    return removed


def new_staging(target: Path, directory: bool = True) -> Path:
    """A new empty staging sibling of `target` (a directory, or a file), its writer's pid in the
    name; the stale ones a killed run left are removed first."""
    clean_stale(target)
    prefix = staging_prefix(target.name)
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=STAGING_SUFFIX, dir=target.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=STAGING_SUFFIX, dir=target.parent)
    os.close(fd)
    return Path(name)


def _renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


_AT_FDCWD, _RENAME_NOREPLACE = -100, 1
_RENAMEAT2 = _renameat2() if sys.platform.startswith("linux") else None


def rename_no_replace(source: Path, target: Path) -> None:
    """Rename `source` to `target`, failing with FileExistsError when anything is at `target`:
    atomically with Linux's renameat2(RENAME_NOREPLACE); elsewhere (or on a file system without
    it) a check, then a hard link for a file or a rename for a directory (which fails over a
    non-empty directory anyway)."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(target))
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    if source.is_dir():
        os.rename(source, target)
        return
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:  # no hard links here
        os.rename(source, target)
        return
    os.unlink(source)


def put_in_place(staging: Path, target: Path, identity: tuple[int, int, int] | None, what: str = "output") -> None:
    """Rename `staging` to `target`, replacing only what `check_target` found there (`identity`):
    nothing, when it found nothing. Anything else at `target` is left alone and the run refused."""
    changed = f"{what} '{target}' was created or changed by someone else while realign was working (another run?); it was not replaced"
    if identity is not None and _identity(target) is None:
        identity = None  # what was checked is gone: nothing to replace, and nothing may be
    if identity is None:
        try:
            rename_no_replace(staging, target)
        except FileExistsError:
            raise RealignError(changed) from None
        return
    if _identity(target) != identity:
        raise RealignError(changed)
    trash = Path(tempfile.mkdtemp(prefix=staging_prefix(target.name), suffix=STAGING_SUFFIX, dir=target.parent))
    old = trash / "old"
    try:
        os.rename(target, old)
    except FileNotFoundError:
        shutil.rmtree(trash, ignore_errors=True)
        raise RealignError(changed) from None
    moved = _identity(old)
    if moved is None or moved[:2] != identity[:2]:  # (the move itself sets a new ctime)
        rename_no_replace(old, target)
        shutil.rmtree(trash, ignore_errors=True)
        raise RealignError(changed)
    try:
        rename_no_replace(staging, target)
    except FileExistsError:
        raise RealignError(f"{changed}; what it replaced is kept at '{old}'") from None
    shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def made_directories(path: Path) -> Iterator[Path]:
    """Create the directory `path` with its missing parents for the block; when the block fails,
    remove again those it created (and left empty): a failed run leaves no empty folders behind."""
    path = Path(path).expanduser()
    created = [p for p in [path, *path.parents] if not os.path.lexists(p)]  # deepest first
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for directory in created:
            try:
                directory.rmdir()
            except OSError:
                break
        raise


def _write_failed(exc: OSError, target: Path, what: str) -> RealignError:
    where = f" ('{exc.filename}')" if exc.filename else ""
    return RealignError(f"cannot write {what} '{target}': {os_reason(exc)}{where}; nothing was written")


@contextmanager
def atomic_directory(target: Path, force: bool, inputs: list[Path], checked: Checked | None = None,
                     what: str = "output") -> Iterator[Path]:
    """Yield an empty staging directory that becomes `target` when the block succeeds. `checked`:
    the target as checked before the work; only what was there then is replaced."""
    now = check_target(target, force, inputs, what)
    identity = now.identity if checked is None else checked.identity
    if now.identity is not None and now.identity != identity:  # (gone is fine: nothing is replaced)
        raise RealignError(f"{what} '{target}' was created or changed while realign was working; it was not replaced")
    target = now.path
    try:
        with made_directories(target.parent):
            staging = new_staging(target, directory=True)
            try:
                yield staging
                put_in_place(staging, target, identity, what)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    except OSError as exc:  # a full disk, a file system gone read-only: after the work, still one line
        raise _write_failed(exc, target, what) from None


def _write_file(path: Path, write, replace: bool, identity: tuple[int, int, int] | None, what: str) -> None:
    """`write(staging file)`, then the file renamed to `path`: over whatever is there with
    `replace`, else replacing only what was checked (`identity`)."""
    try:
        with made_directories(path.parent):
            tmp = new_staging(path, directory=False)
            try:
                write(tmp)
                if replace:
                    os.replace(tmp, path)
                else:
                    put_in_place(tmp, path, identity, what)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    except OSError as exc:
        raise _write_failed(exc, path, what) from None


def write_text_atomic(path: Path, text: str, what: str = "file") -> None:
    """`text` written to a staging sibling and renamed over `path` (reports, responses: files
    that are replaced by design)."""
    path = Path(path).expanduser()
    _write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), True, None, what)


def save_safetensors_atomic(path: Path, tensors: dict, metadata: dict[str, str], force: bool, inputs: list[Path]) -> None:
    """A safetensors file written to a staging sibling and renamed into place."""
    from safetensors.torch import save_file

    checked = check_target(path, force, inputs, kind="file")
    _write_file(checked.path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata),
                False, checked.identity, "output")
