"""Atomic file writes and checksummed reads, shared by every backend's disk tier."""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from typing import Any, BinaryIO, Callable, Iterable, Optional, Protocol, Union

from .errors import CorruptFileError

Chunks = Union[bytes, bytearray, memoryview, Iterable[Union[bytes, bytearray, memoryview]]]


class Writer(Protocol):
    """What ``atomic_write`` hands a writing function: a binary file's ``write``."""

    def write(self, data: bytes) -> int: ...


def model_file(directory: str, name: str, suffix: str) -> str:
    """A file name for ``name`` that is safe on any file system and unique per name."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80] or "model"
    tag = hashlib.sha256(name.encode()).hexdigest()[:10]
    return os.path.join(directory, f"{safe}-{tag}{suffix}")


def atomic_write(path: str, data: Union[Chunks, Callable[[Writer], None]]) -> str:
    """Write ``data`` (bytes, an iterable of chunks, or ``fn(file)`` writing to a binary file) to
    ``path`` atomically: a temporary file in the same folder, fsync, then rename. Returns the
    sha256 hex digest of what was written. On failure nothing is left at ``path``'s place."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as raw:
            hashing = _HashingWriter(raw)
            if callable(data):
                data(hashing)
            elif isinstance(data, (bytes, bytearray, memoryview)):
                hashing.write(data)
            else:
                for chunk in data:
                    hashing.write(chunk)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return hashing.hexdigest()


def read_verified(path: str, sha256: Optional[str], *, model: Optional[str] = None) -> bytes:
    """Read ``path`` and check its sha256 (when given); raises :class:`CorruptFileError`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CorruptFileError(f"cannot read {path}: {exc}", model=model) from exc
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise CorruptFileError(f"{path} fails its sha256 check (expected {sha256[:16]}..., "
                                   f"found {actual[:16]}...): the file was changed or truncated", model=model)
    return data


def read_into(f: Any, view: memoryview, digest: Any = None, chunk: int = 64 << 20) -> int:
    """Fill ``view`` from the open file ``f`` in ``chunk``-byte reads (no intermediate copies),
    feeding ``digest`` (a hashlib object) if given. Returns the bytes read: less than the view
    if the file ended first."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:got + chunk])
        if not n:
            break
        if digest is not None:
            digest.update(view[got:got + n])
        got += n
    return got


def sha256_file(path: str) -> str:
    """The sha256 hex digest of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(16 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def remove_quietly(path: Optional[str]) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


class _HashingWriter:
    """A binary file wrapper that hashes what passes through."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()

    def write(self, data: Union[bytes, bytearray, memoryview]) -> int:
        self._hash.update(data)
        return self._raw.write(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # it exists, under another user
        return True
    return True


def reclaim_stale(folder: str, prefix: str) -> int:
    """Remove ``folder``'s entries named ``PREFIX<pid>-...`` whose process is gone (files a process
    left behind when it ended without cleaning up). Returns how many were removed."""
    import shutil
    removed = 0
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
            removed += 1
    return removed


def private_space(folder: str, prefix: str) -> str:
    """A new folder of this process's own inside ``folder`` (``PREFIX<pid>-<random>``), after
    reclaiming those of processes that are gone: two caches sharing ``folder`` never touch each
    other's files."""
    import tempfile
    os.makedirs(folder, exist_ok=True)
    reclaim_stale(folder, prefix)
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=folder)


def remove_tree(path: Optional[str]) -> None:
    """Remove a folder and everything in it, if there is one; never raises."""
    if path:
        import shutil
        shutil.rmtree(path, ignore_errors=True)
