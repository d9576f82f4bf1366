"""Files that survive a kill: atomic replacement, and one writer per results folder.

- `atomic_write(path, write)`: `write(f)` fills a temporary file beside `path`, which is fsynced
  and renamed over `path`; a kill at any moment leaves the old file or the new one, never a torn one.
- `FolderLock(folder)`: an exclusive `flock` on `folder/.lock`, holding the owner's pid and host.
  The kernel drops the lock when its process dies (kill -9 included), so a stale lock never
  blocks; a second writer is refused at once, naming the first. Re-entrant within a process.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from typing import Callable, IO

LOCK_FILE = ".lock"


class FolderBusyError(RuntimeError):
    """Another live process writes this folder."""


def _fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Replace `path` with what `write` writes into a binary file object, atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_folder(folder)


def atomic_write_json(path: str, data, **dump_kw) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(data, **dump_kw).encode()))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class FolderLock:
    """`with FolderLock(folder):` — this process is the folder's only writer while inside."""

    _held: dict[str, list] = {}  # realpath -> [fd, depth]: re-entrant within one process

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_FILE)

    def __enter__(self) -> "FolderLock":
        key = os.path.realpath(self.path)
        if key in self._held:
            self._held[key][1] += 1
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise FolderBusyError(f"{self.folder} is being written by another run ({self._owner()}); wait for "
                                  "it to finish or stop it, or choose another --out") from e
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        self._held[key] = [fd, 1]
        return self

    def _owner(self) -> str:
        try:
            with open(self.path) as f:
                owner = json.load(f)
            return f"pid {owner['pid']} on {owner['host']}, since {owner['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "owner unknown"

    def __exit__(self, *exc) -> None:
        key = os.path.realpath(self.path)
        held = self._held[key]
        held[1] -= 1
        if held[1] == 0:
            del self._held[key]
            os.close(held[0])  # closing the descriptor drops the flock


def run_get_config(path: str, folder: str, error: type):
    """`get_config()` of the config file `path` (a Python file; configs live in `folder`), or
    `error` naming the fix when the file is missing or defines none."""
    import importlib.util
    if not os.path.isfile(path):
        raise error(f"--config={path}: no such file; {folder}")
    spec = importlib.util.spec_from_file_location(f"config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise error(f"--config={path} defines no get_config()")
    return module.get_config()
