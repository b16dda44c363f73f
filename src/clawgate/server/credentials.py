"""The gateway's tokens: where they come from, which one a client presented, what it may ask for.

`load_credentials` reads token files once, at start; the rest is pure. A
credential's `ceiling` is the highest set of scopes a connection holding it may
be granted (the unnamed `token` has every scope; named `tokens` have what the
configuration gives them, read only by default).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from clawgate.protocol.constants import SCOPE_NAMES
from clawgate.settings import Settings, is_loopback

ALL_SCOPES = frozenset(SCOPE_NAMES)
# A token guessed at 10 tries a minute per address is safe only if it is long; 16 characters
# of a random token (`openssl rand -hex 16` gives 32) leave nothing to guess.
MIN_TOKEN_CHARS = 16
DEFAULT_NAME = "default"


@dataclass(frozen=True)
class Credential:
    name: str
    secret: str
    ceiling: frozenset[str]


@dataclass(frozen=True)
class Credentials:
    entries: tuple[Credential, ...] = ()

    @property
    def required(self) -> bool:
        """Whether a client must present a token (any configured token makes it so)."""
        return bool(self.entries)

    def match(self, presented: str) -> Credential | None:
        """The credential whose secret is `presented`, compared in constant time.

        Every entry is compared (no early exit) on SHA-256 digests, so neither which
        entry matched nor the secrets' lengths show in the timing.
        """
        digest = hashlib.sha256(presented.encode("utf-8")).digest()
        found: Credential | None = None
        for entry in self.entries:
            if hmac.compare_digest(digest, hashlib.sha256(entry.secret.encode("utf-8")).digest()):
                found = entry
        return found


def read_token_file(path: Path) -> str:
    """The token in a file: its content with surrounding whitespace (the final newline) removed."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    token = text.strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


def readable_by_others(settings: Settings) -> list[Path]:
    """Token files that users other than the owner may read (worth a warning, not a refusal)."""
    paths = [settings.token_file] + [t.token_file for t in settings.tokens.values()]
    loose = []
    for path in paths:
        if path is None:
            continue
        try:
            mode = Path(path).expanduser().stat().st_mode
        except OSError:
            continue  # load_credentials reports unreadable files
        if mode & 0o077:
            loose.append(Path(path))
    return loose


def expand_ceiling(scopes: list[str]) -> frozenset[str]:
    """A higher scope implies the lower ones, as for a connect request."""
    top = max((SCOPE_NAMES.index(s) for s in scopes if s in SCOPE_NAMES), default=-1)
    return frozenset(SCOPE_NAMES[: top + 1])


def load_credentials(settings: Settings) -> Credentials:
    """Every configured token, file-based ones read now. Raises ValueError on a bad file or a clash."""
    entries: list[Credential] = []
    if settings.token is not None and settings.token_file is not None:
        raise ValueError("set token or token_file, not both")
    if settings.token is not None:
        entries.append(Credential(DEFAULT_NAME, settings.token, ALL_SCOPES))
    elif settings.token_file is not None:
        entries.append(Credential(DEFAULT_NAME, read_token_file(settings.token_file), ALL_SCOPES))
    for name, named in settings.tokens.items():
        if named.token is not None:
            secret = named.token
        else:
            assert named.token_file is not None  # NamedToken requires one of the two
            secret = read_token_file(named.token_file)
        entries.append(Credential(name, secret, expand_ceiling(named.scopes)))
    secrets = [e.secret for e in entries]
    if len(set(secrets)) != len(secrets):
        raise ValueError("two configured tokens are the same: each credential needs its own secret")
    return Credentials(tuple(entries))


def exposure_problems(settings: Settings, credentials: Credentials) -> list[str]:
    """Why this configuration must not listen (empty when it may).

    Without a token the gateway binds loopback only; off loopback every token must be
    long enough that the per-address failure limit makes guessing it hopeless.
    """
    if is_loopback(settings.bind):
        return []
    where = settings.bind or "(all interfaces)"
    if not credentials.required:
        return [
            f"refusing to bind {where} without a token: set CLAWGATE_TOKEN or --token-file "
            "(without a token the gateway only binds loopback)"
        ]
    problems = []
    for entry in credentials.entries:
        label = "the token" if entry.name == DEFAULT_NAME else f"token {entry.name!r}"
        if not entry.secret.strip():
            problems.append(f"refusing to bind {where}: {label} is only whitespace")
        elif len(entry.secret) < MIN_TOKEN_CHARS:
            problems.append(
                f"refusing to bind {where}: {label} is shorter than {MIN_TOKEN_CHARS} characters "
                "(generate one with `openssl rand -hex 16`)"
            )
    return problems
