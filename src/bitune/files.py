"""Atomic writes (a reader sees the old file/folder or the new one, never a half-written one), the leftovers of
interrupted writes, exclusive locks on folders, and file checksums."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bitune.errors import BituneInputError

try:
    import fcntl
except ImportError:  # Windows: folders are not locked
    fcntl = None  # type: ignore[assignment]

# What `atomic_directory` and `atomic_write_text` leave behind when the process dies mid-write: the staging
# copy (".tmp-NAME-XXXX") and, while a folder is being replaced, the retired old one (".old-NAME-XXXX/NAME").
_LEFTOVER = re.compile(r"^\.(tmp|old)-(?P<name>.+?)(-[A-Za-z0-9_]{8})?$")


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `target`; on success it replaces `target` in one rename.

    If the block raises (or the process dies), `target` is untouched and the temporary folder, whose
    name starts with `.tmp-`, is removed (or left behind and ignored by readers).

    Example:
        >>> with atomic_directory("/tmp/bitune-doc-example") as folder:
        ...     _ = (folder / "a.txt").write_text("done")
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a checkpoint is as readable as any folder
    try:
        yield staging
        _fsync_tree(staging)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.chmod(temporary, 0o666 & ~_umask())
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as file:
                os.fsync(file.fileno())


def remove_leftovers(folder: str | Path, names: re.Pattern[str] | None = None) -> list[Path]:
    """Delete what interrupted atomic writes left in `folder` (`.tmp-NAME-*` staging copies, `.old-NAME-*`
    retired folders), for the NAMEs `names` matches (all by default); returns what was removed.

    A process killed between the two renames of a folder replacement leaves the old folder only under its
    retired name: it is moved back first. Call it only while no other process writes into `folder` (hold
    `lock_folder`).

    Example:
        >>> remove_leftovers("/tmp/bitune-doc-example-empty-folder")
        []
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        match = _LEFTOVER.match(path.name)
        if not match or (names is not None and not names.fullmatch(match["name"])):
            continue
        retired, target = path / match["name"], folder / match["name"]
        if match.group(1) == "old" and retired.is_dir() and not target.exists():
            os.replace(
                retired, target
            )  # the replacement never happened: the old folder is still the current one
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        removed.append(path)
    return removed


@contextlib.contextmanager
def lock_folder(folder: str | Path, name: str = ".lock", what: str = "folder") -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (created if needed) for the block, through the file `folder/name`.

    Another process that asks for the same lock meanwhile gets a `BituneInputError` naming the folder and the
    process that holds it. The operating system releases the lock when the holder dies, even by `kill -9`;
    the lock file is removed when the block ends. `what` names the folder in the error ("output_dir").
    Without `fcntl` (Windows) nothing is locked.

    Example:
        >>> with lock_folder("/tmp/bitune-doc-example-lock"):
        ...     pass
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise BituneInputError(f"{what} {folder} is a file, not a folder; choose a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BituneInputError(f"{what} {folder}: cannot create it ({error.strerror or error})") from None
    if fcntl is None:
        yield folder
        return
    path = folder / name
    while True:
        try:
            handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held open while the lock is)
        except OSError as error:
            raise BituneInputError(
                f"{what} {folder}: cannot write into it ({error.strerror or error})"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise BituneInputError(
                f"{what} {folder} is in use by another run ({holder}); wait for it to end, or choose another "
                f"{what}"
            ) from None
        try:
            same = os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()  # the holder removed the file while we opened it: lock the new one
    try:
        handle.truncate(0)
        handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield folder
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # before the lock is released, so no one locks a file that is about to vanish
        handle.close()


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as hex.

    Example:
        >>> _ = Path("/tmp/bitune-doc-example.txt").write_text("abc")
        >>> file_sha256("/tmp/bitune-doc-example.txt")[:16]
        'ba7816bf8f01cfea'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
