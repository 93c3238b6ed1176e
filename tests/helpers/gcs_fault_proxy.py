"""A fault-injecting HTTP proxy for GCS tests: it sits on 127.0.0.1 in front of fake-gcs-server
and, by rules the test sets, answers some requests with an HTTP error, resets the connection,
drops the response after the server has acted on the request, or delays it.

Point the clients at it with `realm_jax.storage.emulator_environment(proxy.endpoint)` (gcsfs,
google-cloud-storage, tensorstore and orbax all read it; the CLI needs STORAGE_EMULATOR_HOST
alone). Tensorstore reads its variables once per process, so the code under test runs in a
subprocess started with that environment.

  with FaultProxy(gcs_server.endpoint) as proxy:
    proxy.add("503", r"^POST /upload/.*name=index/.*/manifest\\.json", times=1)
    proxy.add("reset", r"^GET /download/", probability=0.3, times=4)
    ... run the code under test ...
    assert proxy.count("503") == 1

Fault kinds:
  "500", "503" (any 3-digit code): that status with a JSON error body; the server never sees it.
  "reset": the connection is reset (TCP RST) before the request reaches the server.
  "drop": the request reaches the server, then the connection is reset instead of the response
          (the client cannot tell whether its write happened).
  "delay": the response is held back `delay_s` seconds, then forwarded.

Rules are matched against `"METHOD /path?query"` with the path percent-decoded (so object names
read `index/0001/manifest.json`); a multipart upload, which names its object in the body, has
` [name=OBJECT]` appended. The first rule that matches and still has faults to inject
decides; `after` skips that many matching requests first; `probability` draws from a seeded RNG.
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import json
import random
import re
import socket
import struct
import threading
import time
import urllib.parse

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
        "upgrade", "content-length"}


_NAME = re.compile(rb'"name"\s*:\s*"([^"]+)"')


@dataclasses.dataclass
class Rule:
  kind: str
  pattern: re.Pattern
  times: int | None  # faults to inject at most (None: unlimited)
  after: int  # matching requests to let through first
  probability: float
  delay_s: float
  seen: int = 0
  injected: int = 0


@dataclasses.dataclass(frozen=True)
class Injected:
  kind: str
  request: str  # "METHOD /decoded/path?query"


class FaultProxy:
  """A threaded HTTP/1.1 proxy to `upstream` (e.g. fake-gcs-server's http://127.0.0.1:PORT)."""

  def __init__(self, upstream: str, seed: int = 0):
    parsed = urllib.parse.urlparse(upstream)
    self.upstream = upstream.rstrip("/")
    self._up_host, self._up_port = parsed.hostname, parsed.port or 80
    self._rules: list[Rule] = []
    self._rng = random.Random(seed)
    self._lock = threading.Lock()
    self.injected: list[Injected] = []
    self.requests: list[str] = []
    proxy = self

    class Handler(_Handler):
      owner = proxy

    self._server = _Server(("127.0.0.1", 0), Handler)
    self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
    self._thread.start()

  def add(self, kind: str, pattern: str = ".", *, times: int | None = 1, after: int = 0,
          probability: float = 1.0, delay_s: float = 1.0) -> Rule:
    if kind not in ("reset", "drop", "delay") and not re.fullmatch(r"\d{3}", kind):
      raise ValueError(f"unknown fault kind {kind!r}")
    rule = Rule(kind, re.compile(pattern), times, after, probability, delay_s)
    with self._lock:
      self._rules.append(rule)
    return rule

  def clear(self) -> None:
    with self._lock:
      self._rules.clear()

  def count(self, kind: str | None = None, pattern: str = ".") -> int:
    """Faults injected so far (of `kind`, on requests matching `pattern`)."""
    with self._lock:
      return sum(1 for i in self.injected
                 if (kind is None or i.kind == kind) and re.search(pattern, i.request))

  def _decide(self, request: str) -> Rule | None:
    with self._lock:
      self.requests.append(request)
      for rule in self._rules:
        if not rule.pattern.search(request):
          continue
        if rule.times is not None and rule.injected >= rule.times:
          continue
        rule.seen += 1
        if rule.seen <= rule.after or self._rng.random() >= rule.probability:
          continue
        rule.injected += 1
        self.injected.append(Injected(rule.kind, request))
        return rule
    return None

  def close(self) -> None:
    self._server.shutdown()
    self._server.server_close()
    self._thread.join(timeout=10)

  def __enter__(self) -> "FaultProxy":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class _Server(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def handle_error(self, request, client_address):  # resets are ours; a client hanging up is not news
    pass


class _Reset(Exception):
  pass


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"
  owner: FaultProxy

  def log_message(self, *args):  # quiet
    pass

  def _body(self) -> bytes:
    if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
      out = bytearray()
      while True:
        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
          while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
          return bytes(out)
        out += self.rfile.read(size)
        self.rfile.readline()
    n = int(self.headers.get("Content-Length") or 0)
    return self.rfile.read(n) if n else b""

  def _reset(self) -> None:
    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    self.close_connection = True
    raise _Reset

  def _handle(self) -> None:
    body = self._body()
    request = f"{self.command} {urllib.parse.unquote(self.path)}"
    named = _NAME.search(body[:8192]) if "name=" not in request else None
    if named:  # a multipart upload names its object in the body's JSON part
      request += f" [name={named.group(1).decode(errors='replace')}]"
    rule = self.owner._decide(request)
    try:
      if rule is not None and rule.kind == "reset":
        self._reset()
      if rule is not None and rule.kind.isdigit():
        code = int(rule.kind)
        payload = json.dumps({"error": {"code": code, "message": "injected by the test proxy",
                                        "errors": [{"reason": "backendError"}]}}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        return
      status, headers, data = self._forward(body)
      if rule is not None and rule.kind == "drop":
        self._reset()
      if rule is not None and rule.kind == "delay":
        time.sleep(rule.delay_s)
      self.send_response(status)
      for k, v in headers:
        if k.lower() in _HOP or k.lower() in ("server", "date"):
          continue
        if k.lower() == "location":
          v = v.replace(self.owner.upstream, self.owner.endpoint)
        self.send_header(k, v)
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      if self.command != "HEAD":
        self.wfile.write(data)
    except _Reset:
      with _quiet():
        self.connection.close()

  def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    conn = http.client.HTTPConnection(self.owner._up_host, self.owner._up_port, timeout=60)
    try:
      headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
      if body or self.command in ("POST", "PUT", "PATCH"):
        headers["Content-Length"] = str(len(body))
      conn.request(self.command, self.path, body=body or None, headers=headers)
      resp = conn.getresponse()
      data = resp.read()
      return resp.status, resp.getheaders(), data
    finally:
      conn.close()

  do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle


class _quiet:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return exc[0] is not None and issubclass(exc[0], OSError)


__all__ = ["FaultProxy", "Injected", "Rule"]
