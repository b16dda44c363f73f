"""Spawn attachments: written under the state dir (dir 0700, files 0600), 5 MiB per spawn by default.

Names are plain file names: anything that could leave the directory (separators,
`..`, NUL, leading dots) is refused before a byte is written.
"""

from __future__ import annotations

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


def prepare(attachments: list[Attachment], max_bytes: int) -> list[tuple[str, bytes]]:
    """Validate names and sizes (pure); returns what to write."""
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


def write(root: Path, run_id: str, files: list[tuple[str, bytes]], *, owner: str | None = None) -> Path:
    """Write a spawn's files under `root/run_id`; `owner` (the child session) is recorded
    beside it, so retention can delete the directory with its session (docs/disk.md)."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    if owner is not None:
        write_owner(root, run_id, owner)
    target = root / run_id
    target.mkdir(mode=0o700, exist_ok=True)
    target.chmod(0o700)
    for name, data in files:
        path = target / name
        if path.resolve().parent != target.resolve():
            raise InvalidRequest(f"attachment name {name!r} escapes its directory")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    return target


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


def write_owner(root: Path, run_id: str, owner: str) -> None:
    (root / OWNERS_DIR).mkdir(exist_ok=True, mode=0o700)
    fd = os.open(owner_file(root, run_id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(owner)
