"""Exit 0 when a Redis server answers PING on 127.0.0.1:PORT (used by `make redis`)."""

import socket
import sys

port = int(sys.argv[1]) if len(sys.argv) > 1 else 6379
try:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(b"PING\r\n")
        sys.exit(0 if sock.recv(16).startswith(b"+PONG") else 1)
except OSError:
    sys.exit(1)
