"""The clawgate Python client (async, with a small sync wrapper)."""

from clawgate.client.client import Client, ClientError, ConnectionLost
from clawgate.client.sync import SyncClient

__all__ = ["Client", "ClientError", "ConnectionLost", "SyncClient"]
