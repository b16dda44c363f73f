"""A bare WebSocket echo server: the floor that `runs_throughput.py --echo` compares against.

It speaks only as much of the gateway protocol as `clawgate.client.Client` needs: it
sends `connect.challenge`, answers `connect` with a minimal hello, and answers every
other request at once with one response echoing its params. No store, no runs, no
events. Same WebSocket library family as the client (websockets, uvloop), one process.

    .venv/bin/python benchmarks/echo_server.py --port 18800
"""

from __future__ import annotations

import argparse
import asyncio

import msgspec
import websockets
from websockets.asyncio.server import ServerConnection

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
CHALLENGE = _encoder.encode(
    {"type": "event", "event": "connect.challenge", "payload": {"nonce": "n", "ts": 0}}
).decode()


async def handle(ws: ServerConnection) -> None:
    await ws.send(CHALLENGE)
    async for raw in ws:
        frame = _decoder.decode(raw)
        payload = (
            {"type": "hello-ok", "protocol": 3} if frame.get("method") == "connect" else frame.get("params")
        )
        await ws.send(
            _encoder.encode({"type": "res", "id": frame.get("id"), "ok": True, "payload": payload}).decode()
        )


async def serve(port: int) -> None:
    async with websockets.serve(handle, "127.0.0.1", port, compression=None, ping_interval=None):
        print("ready", flush=True)
        await asyncio.Future()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
