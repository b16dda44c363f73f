"""File-system side of retention: attachment directories and disk usage (blocking; run in a thread).

Each attachments directory `attachments/<run_id>` has its owner, the child session,
recorded in `attachments/.owners/<run_id>` (subagents/attachments.py). A directory
is garbage when neither its subagent record nor its owner session exists any more.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from clawgate.subagents.attachments import OWNERS_DIR, owner_file


@dataclass(frozen=True)
class AttachmentDir:
    run_id: str
    owner: str | None  # the child session key, None when not recorded (older dirs, a crash)
    has_dir: bool


def scan_attachments(root: Path) -> list[AttachmentDir]:
    """Every attachments directory and every owner file, paired by run id."""
    if not root.is_dir():
        return []
    dirs = {e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=False) and e.name != OWNERS_DIR}
    owners: dict[str, str] = {}
    owners_root = root / OWNERS_DIR
    if owners_root.is_dir():
        for entry in os.scandir(owners_root):
            try:
                owners[entry.name] = Path(entry.path).read_text()
            except OSError:
                continue
    return [
        AttachmentDir(run_id, owners.get(run_id), run_id in dirs) for run_id in sorted(dirs | set(owners))
    ]


def remove_attachments(root: Path, run_id: str) -> None:
    shutil.rmtree(root / run_id, ignore_errors=True)
    try:
        owner_file(root, run_id).unlink()
    except OSError:
        pass


def tree_bytes(path: Path) -> int:
    """Apparent size of every file under `path` (0 when it does not exist)."""
    total = 0
    if path.is_file():
        return path.stat().st_size
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


def free_bytes(path: Path) -> int | None:
    """Bytes available to this process on the file system holding `path`."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def usage(state_dir: Path, extra_files: list[Path]) -> tuple[int, int | None]:
    """(bytes under the state dir plus files kept elsewhere, free bytes on its file system)."""
    used = tree_bytes(state_dir)
    root = state_dir.resolve()
    for path in extra_files:
        try:
            if path.resolve().is_relative_to(root):
                continue  # counted with the state dir
            used += path.stat().st_size
        except OSError:
            continue
    return used, free_bytes(state_dir)
