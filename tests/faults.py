"""A fault-injecting HTTP proxy on loopback, in front of the loopback S3 server (moto).

Every request is forwarded unless a switched-on fault takes it: ``503 SlowDown`` with a
probability, the connection closed half-way through the response with a probability, ``500
InternalError`` to every PUT and POST for a time window, or a request held until released
(and then dropped unanswered, as by a process that died while sending it), or 403 AccessDenied
to the reads of some objects. What was injected
is counted, so a test can show that its faults happened.
"""
from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "content-length"}
ERRORS = {"slow_down": (503, "SlowDown", "Please reduce your request rate."),
          "refused": (500, "InternalError", "We encountered an internal error. Please try again."),
          "denied": (403, "AccessDenied", "Access Denied")}


@dataclass
class Faults:
    """The switches; a test changes them at any time (the proxy reads them per request)."""

    slow_down: float = 0.0  # probability that a request is answered 503 SlowDown
    cut: float = 0.0  # probability that the connection is closed half-way through the response's body
    refuse_writes_until: float = 0.0  # time.monotonic(): PUT and POST answered 500 until then
    refuse_writes_for: float = 0.0  # seconds of 500s to start at the first write whose path holds refuse_after
    refuse_after: str = ""
    hold: str = ""  # PUTs whose path holds this are held (see FaultProxy.held) until released, then dropped
    deny: str = ""  # reads (GET, HEAD) whose path holds this are answered 403 AccessDenied
    seed: int = 0
    rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)


class FaultProxy:
    """The proxy: ``endpoint`` is its URL; use it as the S3 endpoint of the code under test."""

    def __init__(self, upstream: str, faults: Faults | None = None):
        self.upstream = urlsplit(upstream)
        self.faults = faults or Faults()
        self.counts: Counter[str] = Counter()  # forwarded, or the fault: slow_down, cut, refused, hold, denied
        self.held = threading.Event()  # set when a request is being held
        self.release = threading.Event()  # set to let held requests go (they are dropped)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()

    def choose(self, method: str, path: str) -> str:
        """The fault for one request: '' (forward it), 'hold', 'denied', 'refused', 'slow_down' or 'cut'."""
        with self._lock:
            faults, now = self.faults, time.monotonic()
            writing = method in ("PUT", "POST")
            if writing and faults.refuse_writes_for and faults.refuse_after in path:
                faults.refuse_writes_until, faults.refuse_writes_for = now + faults.refuse_writes_for, 0.0
            if method == "PUT" and faults.hold and faults.hold in path:
                fault = "hold"
            elif method in ("GET", "HEAD") and faults.deny and faults.deny in path:
                fault = "denied"
            elif writing and now < faults.refuse_writes_until:
                fault = "refused"
            elif faults.rng.random() < faults.slow_down:
                fault = "slow_down"
            elif faults.rng.random() < faults.cut:
                fault = "cut"
            else:
                fault = "forwarded"
            self.counts[fault] += 1
            return "" if fault == "forwarded" else fault

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet: the counts tell what happened
                pass

            def _proxy(self) -> None:
                body = self._read_body()
                self.close_connection = True
                fault = proxy.choose(self.command, self.path)
                if fault == "hold":
                    proxy.held.set()
                    proxy.release.wait()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault in ERRORS:
                    self._answer_error(*ERRORS[fault])
                    return
                status, reason, headers, payload = self._forward(body)
                head = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers]
                raw = ("\r\n".join(head + ["Connection: close", "", ""])).encode("latin-1")
                payload = b"" if self.command == "HEAD" else payload
                if fault == "cut":  # the headers and half the body (none of a body-less answer), then it drops
                    self.wfile.write(raw + payload[:len(payload) // 2] if payload else b"")
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(raw + payload)

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
                upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    headers["Content-Length"] = str(len(body))
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    payload = response.read()
                    kept = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
                    # a HEAD answer's length is the object's, though no body follows
                    length = response.getheader("Content-Length", "0") if self.command == "HEAD" else len(payload)
                    return response.status, response.reason, kept + [("Content-Length", str(length))], payload
                finally:
                    upstream.close()

            def _answer_error(self, status: int, code: str, message: str) -> None:
                payload = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                           f"<Message>{message}</Message><RequestId>lgca-fault</RequestId></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(payload)))
                self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _proxy

        return Handler
