"""An HTTP server that records every request it receives, as vLLM would get them.

Usage: squatter.py --port PORT --record FILE [--host HOST] [anything else, ignored]

Run by a test as a stranger on a worker's port (a port squatter), or by citadeld
as a fake vLLM (its ``python``: the vllm type's argv passes through, and only
``--host`` and ``--port`` are read). Each request is appended to FILE as one JSON
line (method, path, headers, body) before it is answered: ``/health`` 200, a
completion or chat completion 200 with a one-token answer, anything else 404.
Prints ``listening`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_LOCK = threading.Lock()


def _answer(path: str, model: str) -> dict[str, Any] | None:
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    if path == "/v1/completions":
        return {"id": "cmpl-1", "object": "text_completion", "model": model, "usage": usage,
                "choices": [{"index": 0, "text": "pong", "finish_reason": "length"}]}
    if path == "/v1/chat/completions":
        return {"id": "chatcmpl-1", "object": "chat.completion", "model": model, "usage": usage,
                "choices": [{"index": 0, "finish_reason": "length",
                             "message": {"role": "assistant", "content": "pong"}}]}
    return None


def make_handler(record: str) -> type[BaseHTTPRequestHandler]:
    """A handler class that appends each request to ``record``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode(errors="replace") if length else ""
            entry = {"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                     "body": body}
            with _LOCK, open(record, "a") as fh:
                fh.write(json.dumps(entry) + "\n")
            if self.path == "/health":
                status, data = 200, b"ok"
            else:
                try:
                    model = str(json.loads(body).get("model", "?")) if body else "?"
                except ValueError:
                    model = "?"
                answer = _answer(self.path, model)
                status, data = (200, json.dumps(answer).encode()) if answer else (404, b"{}")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def main() -> None:
    """Parse the known flags, listen, and serve until killed."""
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--record", required=True)
    args, _ = parser.parse_known_args()
    server = ThreadingHTTPServer((args.host, args.port), make_handler(args.record))
    print("listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
