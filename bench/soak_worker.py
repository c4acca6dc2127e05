"""A worker for bench/soak.py: serves /health and a /metrics page, may start a child.

    python soak_worker.py --port P --page normal|duplicate-labels|malformed|huge|slow [--child] LABEL

The page kinds are hostile on purpose: ``duplicate-labels`` carries labels named
``service`` and ``exported_service`` (relabelling must not write one twice),
``malformed`` has lines that are not exposition text, ``huge`` is 8 MiB, and
``slow`` answers after 30 s. It prints a line a second, with terminal escapes
and HTML in it, and the secret in ``SOAK_SECRET`` URL-encoded (citadeld must
mask it). The last argument is a label the bench finds the worker by.
"""

from __future__ import annotations

import argparse
import http.server
import os
import subprocess
import sys
import threading
import time
import urllib.parse

NORMAL = (
    "# HELP soak_requests_total Requests.\n# TYPE soak_requests_total counter\n"
    'soak_requests_total{model="m",engine="0"} 17.0\n'
    "# HELP soak_queue Queue length.\n# TYPE soak_queue gauge\nsoak_queue 3.0\n"
)
PAGES = {
    "normal": NORMAL,
    "duplicate-labels": NORMAL + '# TYPE soak_dup gauge\nsoak_dup{service="x",exported_service="y"} 1.0\n',
    "malformed": NORMAL + 'soak_bad{model="unterminated 1\nthis is not a sample\nsoak_bad2{a="b"} not-a-number\n',
    "huge": NORMAL + "# TYPE soak_big gauge\n" + "".join(
        f'soak_big{{i="{i}",pad="{"x" * 64}"}} {i}\n' for i in range(90_000)),
    "slow": NORMAL,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--page", choices=sorted(PAGES), default="normal")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("label")
    args = parser.parse_args()
    page = PAGES[args.page].encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics" and args.page == "slow":
                time.sleep(30)
            body = page if self.path == "/metrics" else b"ok\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except OSError:
                pass

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    if args.child:
        subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(1)", args.label + "-child"])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    secret = urllib.parse.quote(os.environ.get("SOAK_SECRET", ""), safe="")
    n = 0
    while True:
        n += 1
        print(f"line {n} \x1b[31mred\x1b[0m <b>bold</b> uploading to /bucket/{secret}/x", flush=True)
        time.sleep(1)


if __name__ == "__main__":
    main()
