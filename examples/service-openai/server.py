"""A small OpenAI-compatible server for trying meshgpu services on any machine (CPU, standard
library only): it "generates" by echoing the last user message word by word, so replies are
deterministic and need no model weights.

Endpoints (under ``/v1``, as vLLM, SGLang and TGI serve them):

- ``GET /v1/models``
- ``POST /v1/chat/completions`` -- JSON, or ``"stream": true``: server-sent events, one
  ``data: {chunk}`` per token, ending with ``data: [DONE]`` (``stream_options.include_usage``
  adds a usage chunk)
- ``POST /v1/completions`` -- the same for a ``prompt``
- ``POST /v1/embeddings`` -- deterministic unit vectors (a hash of the text), floats or base64
- ``GET /health`` -- 200 once it serves (for ``probes``)

Settings (environment): ``PORT`` (default ``MESHGPU_SERVICE_PORT``, else 8000), ``MODEL_NAME`` (default
``meshgpu/echo-small``), ``TOKEN_DELAY`` seconds between streamed tokens (default 0.02),
``EMBEDDING_DIM`` (default 64), ``LOG_REQUESTS=1`` to log each request.

Replies: without ``max_tokens`` the echo (``Echo: <last user message>``, at most 256 tokens,
``finish_reason: stop``); with ``max_tokens`` exactly that many tokens (the echo repeated as
needed, ``finish_reason: length``), so a client can ask for a stream of known length.

    PORT=8000 python3 server.py
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = os.environ.get("MODEL_NAME", "meshgpu/echo-small")
DELAY = float(os.environ.get("TOKEN_DELAY", "0.02"))
EMBEDDING_DIM = int(os.environ.get("EMBEDDING_DIM", "64"))
LOG = os.environ.get("LOG_REQUESTS", "") not in ("", "0")
MAX_BODY = 16 * 1024 * 1024
MAX_ECHO_TOKENS = 256
MAX_TOKENS_LIMIT = 100_000
CREATED = int(time.time())


class BadRequest(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def _words(text: str) -> list[str]:
    return text.split()


def _content_text(content: Any) -> str:
    """A chat message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(p.get("text", ""))
            for p in content
            if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def generate(prompt: str, max_tokens: int | None) -> tuple[list[str], str]:
    """The tokens of a reply (each with its leading space but the first) and its finish reason."""
    echo = ["Echo:", *_words(prompt)]
    if max_tokens is None:
        words, reason = echo[:MAX_ECHO_TOKENS], "stop"
    else:
        words = [echo[i % len(echo)] for i in range(max_tokens)]
        reason = "length"
    return [w if i == 0 else " " + w for i, w in enumerate(words)], reason


def embed(text: str, dim: int) -> list[float]:
    """A deterministic unit vector for ``text``: SHA-256 in counter mode, mapped to [-1, 1]."""
    raw = b""
    counter = 0
    while len(raw) < 4 * dim:
        raw += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    values = [(x / 0xFFFFFFFF) * 2 - 1 for x in struct.unpack(f"<{dim}I", raw[: 4 * dim])]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def _max_tokens(body: dict[str, Any]) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_TOKENS_LIMIT:
        raise BadRequest(400, f"max_tokens must be an integer in 1..{MAX_TOKENS_LIMIT}")
    return value


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every reply has a length or is chunked
    server_version = "meshgpu-echo/1"
    timeout = 300  # an idle keep-alive connection is closed after this many seconds

    def log_message(self, format: str, *args: Any) -> None:
        if LOG:
            super().log_message(format, *args)

    # -- plumbing -----------------------------------------------------------------------------

    def _send_json(self, status: int, doc: Any) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, code: str = "invalid_request_error") -> None:
        self._send_json(status, {"error": {"message": message, "type": code, "code": code}})

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts, total = [], 0
            while True:
                line = self.rfile.readline(1024)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                total += size
                if total > MAX_BODY:
                    self.close_connection = True
                    raise BadRequest(413, "request body too large", "request_too_large")
                parts.append(self.rfile.read(size))
                self.rfile.readline(16)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True
            raise BadRequest(413, "request body too large", "request_too_large")
        return self.rfile.read(length) if length > 0 else b""

    def _json_body(self) -> dict[str, Any]:
        raw = self._read_body()
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise BadRequest(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest(400, "the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != MODEL:
            raise BadRequest(404, f"the model {model!r} does not exist", "model_not_found")
        return body

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def _event(self, data: str) -> None:
        payload = f"data: {data}\n\n".encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))
        self.wfile.flush()

    def _end_stream(self) -> None:
        self._event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # -- routes -------------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/health", "/healthz", "/v1/health"):
            self._send_json(200, {"status": "ok", "model": MODEL})
        elif path == "/v1/models":
            self._send_json(
                200,
                {
                    "object": "list",
                    "data": [
                        {"id": MODEL, "object": "model", "created": CREATED, "owned_by": "meshgpu"}
                    ],
                },
            )
        elif path == f"/v1/models/{MODEL}":
            self._send_json(
                200, {"id": MODEL, "object": "model", "created": CREATED, "owned_by": "meshgpu"}
            )
        else:
            self._error(404, f"no route GET {path}", "not_found")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        routes = {
            "/v1/chat/completions": self._chat,
            "/v1/completions": self._completions,
            "/v1/embeddings": self._embeddings,
        }
        route = routes.get(path)
        try:
            if route is None:
                self._read_body()
                raise BadRequest(404, f"no route POST {path}", "not_found")
            route(self._json_body())
        except BadRequest as e:
            self._error(e.status, e.message, e.code)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away mid-stream

    def _chat(self, body: dict[str, Any]) -> None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest(400, "messages must be a non-empty list")
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        prompt = _content_text(users[-1].get("content")) if users else ""
        prompt_tokens = sum(
            len(_words(_content_text(m.get("content")))) for m in messages if isinstance(m, dict)
        )
        tokens, reason = generate(prompt, _max_tokens(body))
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(tokens),
            "total_tokens": prompt_tokens + len(tokens),
        }
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(tokens)}
            self._send_json(
                200,
                {
                    "id": rid,
                    "object": "chat.completion",
                    "created": created,
                    "model": MODEL,
                    "choices": [
                        {"index": 0, "message": message, "finish_reason": reason, "logprobs": None}
                    ],
                    "usage": usage,
                },
            )
            return
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish: str | None) -> str:
            doc: dict[str, Any] = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": MODEL,
                "choices": [
                    {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                ],
            }
            if include_usage:
                doc["usage"] = None
            return json.dumps(doc)

        self._start_stream()
        self._event(chunk({"role": "assistant", "content": ""}, None))
        for tok in tokens:
            if DELAY > 0:
                time.sleep(DELAY)
            self._event(chunk({"content": tok}, None))
        self._event(chunk({}, reason))
        if include_usage:
            self._event(
                json.dumps(
                    {
                        "id": rid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": MODEL,
                        "choices": [],
                        "usage": usage,
                    }
                )
            )
        self._end_stream()

    def _completions(self, body: dict[str, Any]) -> None:
        prompt = body.get("prompt", "")
        if isinstance(prompt, list):
            prompt = " ".join(p for p in prompt if isinstance(p, str))
        if not isinstance(prompt, str):
            raise BadRequest(400, "prompt must be a string or a list of strings")
        tokens, reason = generate(prompt, _max_tokens(body))
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        n_prompt = len(_words(prompt))
        usage = {
            "prompt_tokens": n_prompt,
            "completion_tokens": len(tokens),
            "total_tokens": n_prompt + len(tokens),
        }

        def doc(text: str, finish: str | None) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": MODEL,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            }

        if not body.get("stream"):
            self._send_json(200, doc("".join(tokens), reason) | {"usage": usage})
            return
        self._start_stream()
        for i, tok in enumerate(tokens):
            if DELAY > 0:
                time.sleep(DELAY)
            self._event(json.dumps(doc(tok, reason if i == len(tokens) - 1 else None)))
        self._end_stream()

    def _embeddings(self, body: dict[str, Any]) -> None:
        inputs = body.get("input")
        if isinstance(inputs, str) or (
            isinstance(inputs, list) and inputs and all(isinstance(t, int) for t in inputs)
        ):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise BadRequest(400, "input must be a string or a non-empty list")
        dim = body.get("dimensions") or EMBEDDING_DIM
        if not isinstance(dim, int) or not 1 <= dim <= 4096:
            raise BadRequest(400, "dimensions must be an integer in 1..4096")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise BadRequest(400, "encoding_format must be float or base64")
        data, total = [], 0
        for i, item in enumerate(inputs):
            text = item if isinstance(item, str) else json.dumps(item)
            total += len(_words(text)) if isinstance(item, str) else len(item)
            vec = embed(text, dim)
            value: Any = vec
            if fmt == "base64":
                value = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": value})
        self._send_json(
            200,
            {
                "object": "list",
                "data": data,
                "model": MODEL,
                "usage": {"prompt_tokens": total, "total_tokens": total},
            },
        )


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 4096  # many clients may connect at once (streams are long)

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().server_bind()

    def process_request(self, request: Any, client_address: Any) -> None:
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().process_request(request, client_address)


def main() -> None:
    port = int(os.environ.get("PORT") or os.environ.get("MESHGPU_SERVICE_PORT") or 8000)
    host = os.environ.get("HOST", "0.0.0.0")
    threading.stack_size(512 * 1024)  # a thread per connection: keep thousands cheap
    server = Server((host, port), Handler)

    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"serving {MODEL} on http://{host}:{port}/v1 (token delay {DELAY}s)", flush=True)
    server.serve_forever(poll_interval=0.5)
    server.server_close()
    sys.exit(0)


if __name__ == "__main__":
    main()
