"""Spawn attachments: written under the state dir (dir 0700, files 0600), 5 MiB and 50 files per
spawn by default.

Names are plain file names: anything that could leave the directory (separators,
`..`, NUL, leading dots) is refused before a byte is written. Writing never
follows a symbolic link: the directories are opened with O_NOFOLLOW and each file
is created relative to its directory's descriptor, so a link planted in the state
dir cannot redirect a write elsewhere. `write` does blocking file I/O: the caller
runs it in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import os
import re
import shutil
from pathlib import Path

from clawgate.clip import clip
from clawgate.errors import InvalidRequest
from clawgate.protocol.schemas import Attachment

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_\-. ]{0,254}$")


def check_name(name: str) -> None:
    if not _NAME_RE.match(name) or ".." in name or name.strip() != name:
        raise InvalidRequest(
            f"attachment name {clip(name)!r} is not a plain file name",
            details={"field": "params.attachments.name"},
        )


def decode(att: Attachment) -> bytes:
    if att.encoding == "base64":
        try:
            return base64.b64decode(att.content, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest(
                f"attachment {clip(att.name)!r} is not valid base64",
                details={"field": "params.attachments.content"},
            ) from None
    return att.content.encode("utf-8")


def _decoded_size_at_least(att: Attachment) -> int:
    if att.encoding == "base64":
        return max(0, len(att.content) * 3 // 4 - 2)
    return len(att.content)  # UTF-8 has at least one byte per character


def prepare(attachments: list[Attachment], max_bytes: int, max_files: int = 50) -> list[tuple[str, bytes]]:
    """Validate the count, names and sizes (pure); returns what to write."""
    if len(attachments) > max_files:
        # Checked first: thousands of empty files cost the disk and the loop, not the byte cap.
        raise InvalidRequest(
            f"too many attachments: {len(attachments)} (at most {max_files} per spawn)",
            details={"field": "params.attachments", "maxFiles": max_files},
        )
    files: list[tuple[str, bytes]] = []
    seen: set[str] = set()
    total = 0
    for att in attachments:
        check_name(att.name)
        if att.name in seen:
            raise InvalidRequest(
                f"duplicate attachment name {clip(att.name)!r}", details={"field": "params.attachments.name"}
            )
        seen.add(att.name)
        # Refuse from the encoded size before decoding, so an oversized spawn costs no copy.
        if total + _decoded_size_at_least(att) > max_bytes:
            raise InvalidRequest(
                f"attachments exceed {max_bytes} bytes per spawn",
                details={"field": "params.attachments", "maxBytes": max_bytes},
            )
        data = decode(att)
        total += len(data)
        if total > max_bytes:
            raise InvalidRequest(
                f"attachments exceed {max_bytes} bytes per spawn",
                details={"field": "params.attachments", "maxBytes": max_bytes},
            )
        files.append((att.name, data))
    return files


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW


def write(root: Path, run_id: str, files: list[tuple[str, bytes]], *, owner: str | None = None) -> Path:
    """Write `files` into `root/run_id` (blocking: call it in a thread). Raises OSError (ELOOP)
    when `root` or the run's directory is a symbolic link. `owner` (the child session) is
    recorded beside it, so retention can delete the directory with its session (docs/disk.md)."""
    check_name(run_id)
    try:
        root.mkdir(parents=True, mode=0o700)
    except FileExistsError:
        pass  # opened below without following a link
    root_fd = os.open(root, _DIR_FLAGS)
    try:
        if owner is not None:
            _write_owner_at(root_fd, run_id, owner)
        try:
            os.mkdir(run_id, 0o700, dir_fd=root_fd)
        except FileExistsError:
            pass
        dir_fd = os.open(run_id, _DIR_FLAGS, dir_fd=root_fd)
    finally:
        os.close(root_fd)
    try:
        os.fchmod(dir_fd, 0o700)
        for name, data in files:
            check_name(name)
            fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=dir_fd)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
    finally:
        os.close(dir_fd)
    return root / run_id


async def discard(path: str | None) -> None:
    """`remove` off the event loop: deleting a tree of files is blocking I/O, slow on a busy disk."""
    if path:
        await asyncio.to_thread(remove, path)


def remove(path: str | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            owner_file(Path(path).parent, Path(path).name).unlink()


# The owner of each attachments directory: `root/.owners/<run_id>` holds the child session
# key. A leading dot keeps it apart from run ids (which never start with one).
OWNERS_DIR = ".owners"


def owner_file(root: Path, run_id: str) -> Path:
    return root / OWNERS_DIR / run_id


def _write_owner_at(root_fd: int, run_id: str, owner: str) -> None:
    """`write_owner` through the root's descriptor: no link in the way is followed."""
    try:
        os.mkdir(OWNERS_DIR, 0o700, dir_fd=root_fd)
    except FileExistsError:
        pass
    owners_fd = os.open(OWNERS_DIR, _DIR_FLAGS, dir_fd=root_fd)
    try:
        fd = os.open(run_id, _FILE_FLAGS, 0o600, dir_fd=owners_fd)
        with os.fdopen(fd, "w") as fh:
            fh.write(owner)
    finally:
        os.close(owners_fd)


def write_owner(root: Path, run_id: str, owner: str) -> None:
    (root / OWNERS_DIR).mkdir(exist_ok=True, mode=0o700)
    fd = os.open(owner_file(root, run_id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(owner)
