"""`max_connections` against the process' file-descriptor limit (RLIMIT_NOFILE), checked at start.

Every socket the gateway may hold open (server/sockets.py: connections plus pending
handshakes) needs a descriptor, plus a reserve for the store, logs, the listening
socket and the provider's HTTP client. When the soft limit is lower, it is raised
up to the hard limit; a configuration the hard limit cannot hold is refused at
start (the CLI exits 2), rather than failing at accept time under load, when
clients would be locked out.
"""

from __future__ import annotations

import resource

from clawgate.server.sockets import max_sockets
from clawgate.settings import Settings

FD_RESERVE = 64


class FdLimitError(RuntimeError):
    pass


def plan_fd_limit(soft: int, hard: int, needed: int) -> int | None:
    """The soft limit to set (None: the current one is enough). Raises FdLimitError."""
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    if hard == resource.RLIM_INFINITY or hard >= needed:
        return needed
    raise FdLimitError(
        f"max_connections + max_pending_handshakes need {needed} file descriptors "
        f"(with {FD_RESERVE} in reserve) but RLIMIT_NOFILE allows at most {hard}: "
        "lower max_connections or raise the limit (ulimit -n, LimitNOFILE=)"
    )


def ensure_fd_limit(settings: Settings) -> int:
    """Raise the soft limit if needed; returns the descriptors needed. Raises FdLimitError."""
    needed = max_sockets(settings) + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new_soft = plan_fd_limit(soft, hard, needed)
    if new_soft is not None:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
        except (ValueError, OSError) as exc:
            raise FdLimitError(f"cannot raise RLIMIT_NOFILE to {new_soft}: {exc}") from None
    return needed
