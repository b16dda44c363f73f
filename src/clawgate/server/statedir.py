"""The state dir is the gateway's own: owned by its user, 0700, with no symbolic links in it.

Checked at every start, before the store opens. A state dir owned by another
user, or a `clawgate.db` / `attachments` that is a symbolic link, is refused
with `StateDirError` (the CLI exits 2): another local user could otherwise read
the transcripts or have the gateway write where they point. Modes of what
already exists are tightened (dirs 0700, files 0600), since an older version or
a copy may have left them readable by others.

The state dir itself may be a link (a user may keep it elsewhere): it is
resolved once, and what is inside is then checked without following links.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

DB_FILES = ("clawgate.db", "clawgate.db-wal", "clawgate.db-shm", "clawgate.db-journal")
ATTACHMENTS = "attachments"


class StateDirError(RuntimeError):
    pass


def check_state_dir(path: Path, *, store_is_sqlite: bool = True, uid: int | None = None) -> None:
    uid = os.geteuid() if uid is None else uid
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirError(f"state dir {path} is not a directory")
    _check_owner(path, st, uid)
    _fix_mode(path, st, 0o700)
    names = (*DB_FILES, ATTACHMENTS) if store_is_sqlite else (ATTACHMENTS,)
    for name in names:
        entry = path / name
        try:
            est = os.lstat(entry)
        except FileNotFoundError:
            continue
        _check_entry(entry, est, uid)
        if name == ATTACHMENTS:
            if not stat.S_ISDIR(est.st_mode):
                raise StateDirError(f"{entry} is not a directory")
            _check_tree(entry, uid)


def _check_tree(root: Path, uid: int) -> None:
    """Attachment dirs (one per spawn) and their files: no links, ours, tight modes."""
    with os.scandir(root) as runs:
        for run in runs:
            rst = run.stat(follow_symlinks=False)
            _check_entry(Path(run.path), rst, uid)
            if not stat.S_ISDIR(rst.st_mode):
                continue
            with os.scandir(run.path) as files:
                for f in files:
                    _check_entry(Path(f.path), f.stat(follow_symlinks=False), uid)


def _check_entry(entry: Path, st: os.stat_result, uid: int) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise StateDirError(f"{entry} is a symbolic link; the gateway does not follow links in its state dir")
    _check_owner(entry, st, uid)
    _fix_mode(entry, st, 0o700 if stat.S_ISDIR(st.st_mode) else 0o600)


def _check_owner(entry: Path, st: os.stat_result, uid: int) -> None:
    if st.st_uid != uid:
        raise StateDirError(
            f"{entry} is owned by uid {st.st_uid}, not by the gateway's user (uid {uid}); "
            "use a state dir of your own (--state-dir)"
        )


def _fix_mode(entry: Path, st: os.stat_result, mode: int) -> None:
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(entry, mode)  # not a link: checked with lstat just before
