"""A plain HTTP service for meshgpu (standard library only): it says which replica answered.

- ``GET /`` -- ``hello from replica N on HOST`` (text)
- ``GET /health`` -- 200 (the service's probe)
- ``GET /work?ms=50`` -- sleeps ``ms`` milliseconds first: load that the autoscaler can see
- anything else -- 404

Listens on 0.0.0.0:``PORT`` (default ``MESHGPU_SERVICE_PORT``, else 8000)::

    PORT=8000 python3 server.py
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

REPLICA = os.environ.get("MESHGPU_REPLICA_NUM") or os.environ.get("DSTACK_REPLICA_NUM") or "?"
HOST = socket.gethostname()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "meshgpu-hello/1"
    timeout = 300

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, text: str) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/":
            self._reply(200, f"hello from replica {REPLICA} on {HOST}\n")
        elif url.path == "/health":
            self._reply(200, "ok\n")
        elif url.path == "/work":
            try:
                ms = min(10_000.0, float(parse_qs(url.query).get("ms", ["50"])[0]))
            except ValueError:
                self._reply(400, "ms must be a number\n")
                return
            time.sleep(max(0.0, ms) / 1000)
            self._reply(200, f"worked {ms:g} ms on replica {REPLICA}\n")
        else:
            self._reply(404, f"no such page: {url.path}\n")

    do_HEAD = do_GET


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


def main() -> None:
    port = int(os.environ.get("PORT") or os.environ.get("MESHGPU_SERVICE_PORT") or 8000)
    server = Server(("0.0.0.0", port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"replica {REPLICA} serving on :{port}", flush=True)
    server.serve_forever(poll_interval=0.5)
    server.server_close()
    sys.exit(0)


if __name__ == "__main__":
    main()
