"""The wire vocabulary shared by the server, the methods and the clients: scopes and their order."""

from __future__ import annotations

READ, WRITE, ADMIN = "operator.read", "operator.write", "operator.admin"
SCOPE_NAMES = (READ, WRITE, ADMIN)
# A higher scope implies the lower ones.
SCOPE_RANK = {READ: 1, WRITE: 2, ADMIN: 3}
