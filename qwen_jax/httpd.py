"""The HTTP layer under the WSGI app (server.py): a threaded wsgiref server, its request
handler, and reading a request body.

The standard library's `wsgiref` speaks HTTP/1.0, one request per connection, and leaves some of
HTTP to the application; this module does that part, so that server.py deals only in requests
and replies:
- request bodies: by Content-Length, or chunked (decoded here; neither is a 411); an oversized
  one (up to DISCARD_MAX_BYTES) is read and dropped so that clients which send it all before
  reading still get the 413, and so is one left unread by an earlier refusal (401, 404, ...);
- `Expect: 100-continue` is answered once the app wants the body (SEND_CONTINUE), so a request
  refused without it gets its answer instead;
- the app can ask whether the client has gone (CLIENT_GONE), to cancel a reply nobody awaits;
- what `http.server` refuses before the app runs (a malformed request line, too many or too
  long headers, a URL over 64 KiB, conflicting Content-Length headers) is an OpenAI error object
  with a status line, not its HTML page, and a warning in the log;
- each socket read or write may wait at most SOCKET_TIMEOUT_S, and the whole request must
  arrive within REQUEST_DEADLINE_S;
- at most MAX_CONNECTIONS connections are served at once (a 503 past that; `serve` raises the
  process's open-file limit, or holds fewer: connection_limit), and running out of file
  descriptors makes new connections wait rather than the accept loop spin.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import select
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from http import HTTPStatus
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from qwen_jax import protocol

log = logging.getLogger("qwen_jax.server")  # one log for the server, app and HTTP alike

# The environ key of a callable that says whether the client has closed its connection (set
# by make_server's handler; other WSGI servers leave it out and nothing watches).
CLIENT_GONE = "qwen_jax.client_gone"
# The environ key of a callable that sends "100 Continue" (make_server's handler sets it when
# the client asked with `Expect: 100-continue`): called once the body is wanted, after the
# checks that could refuse the request without it.
SEND_CONTINUE = "qwen_jax.send_continue"
# The environ key of a callable the app calls once it has read the request body (read_body
# does): from then on the request deadline (REQUEST_DEADLINE_S) no longer applies.
REQUEST_READ = "qwen_jax.request_read"


def socket_closed(sock: socket.socket) -> bool:
    """Whether the peer has closed (or reset) this connection; data waiting to be read does not
    count, and is left where it is."""
    try:
        # poll, not select: select cannot watch a descriptor numbered 1024 or more, and said
        # so with a ValueError, which read as "gone" and cancelled busy servers' replies.
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        if not poller.poll(0):
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):  # reset, or already closed on our side
        return True


def read_body(environ: dict[str, Any], limit: int) -> bytes:
    """The request body, by Content-Length or chunked, at most `limit` bytes; protocol errors
    (400, 411, 413) otherwise."""
    try:
        return _read_body(environ, limit)
    finally:
        environ.get(REQUEST_READ, _nothing)()  # the reply is not bound by the read deadline


def _read_body(environ: dict[str, Any], limit: int) -> bytes:
    send_continue = environ.get(SEND_CONTINUE, _nothing)
    encoding = environ.get("HTTP_TRANSFER_ENCODING", "").strip().lower()
    if encoding:
        if encoding != "chunked":
            raise protocol.invalid_request(
                f"Unsupported Transfer-Encoding {encoding!r}: send the body as is (with a "
                "Content-Length) or chunked.")
        send_continue()
        return _read_chunked(environ["wsgi.input"], limit)
    if not environ.get("CONTENT_LENGTH"):
        raise protocol.length_required()
    length = content_length(environ)
    if length is None:
        raise protocol.invalid_request("Invalid Content-Length header.")
    if length > limit:  # checked before keeping a byte of the body
        if SEND_CONTINUE not in environ:  # else the client waits, and sends nothing
            _discard(environ["wsgi.input"], length)
        raise protocol.payload_too_large(limit)
    send_continue()
    try:
        raw = environ["wsgi.input"].read(length) if length > 0 else b""
    except OSError:  # the socket timed out (SOCKET_TIMEOUT_S) or was reset mid-body
        raise protocol.invalid_request(
            f"The request body did not arrive in full ({length} bytes announced by "
            "Content-Length)."
        ) from None
    if len(raw) < length:  # the client closed its side early
        raise protocol.invalid_request(
            f"The request body has {len(raw)} bytes, fewer than its Content-Length of {length}."
        )
    return raw


def content_length(environ: dict[str, Any]) -> int | None:
    """The Content-Length, or None if it is missing or not digits alone (RFC 9112 8.6: int()
    would also take "+75" and "1_0")."""
    text = environ.get("CONTENT_LENGTH", "").strip()
    return int(text) if text.isascii() and text.isdigit() else None


def _nothing() -> None:
    pass


# An oversized body is read and dropped up to this size before the 413 goes out: clients that
# send the whole body before reading (Python's http.client, requests) would otherwise get a
# broken pipe instead of the answer. Beyond it the connection is closed unread.
DISCARD_MAX_BYTES = 64 * 1024 * 1024


def _discard(stream: Any, length: int) -> None:
    if length > DISCARD_MAX_BYTES:
        return
    try:
        while length > 0 and (data := stream.read(min(length, 1 << 20))):
            length -= len(data)
    except OSError:  # timed out or reset: the 413 is all that is left to send
        pass


_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,8}")
_MAX_TRAILER_LINES = 64


def _read_chunked(stream: Any, limit: int) -> bytes:
    """A `Transfer-Encoding: chunked` body (RFC 9112 7.1), at most `limit` bytes; wsgiref leaves
    the decoding to the application. Chunk extensions and trailer fields are read and ignored."""
    body, total = bytearray(), 0
    try:
        while True:
            line = stream.readline(1024)
            size_text = line.split(b";", 1)[0].strip()
            if not line.endswith(b"\n") or not _CHUNK_SIZE.fullmatch(size_text):
                raise protocol.invalid_request("Malformed chunked request body.")
            size = int(size_text, 16)
            if size == 0:
                break
            total += size
            if total > DISCARD_MAX_BYTES:  # too large to read even to drop it: stop here
                raise protocol.payload_too_large(limit)
            data = stream.read(size)
            if len(data) < size or stream.readline(3) not in (b"\r\n", b"\n"):
                raise protocol.invalid_request("Malformed chunked request body.")
            if total <= limit:  # past the limit, read on only to drop (see DISCARD_MAX_BYTES)
                body += data
        for _ in range(_MAX_TRAILER_LINES):  # trailer fields, up to an empty line
            if stream.readline(8192) in (b"\r\n", b"\n", b""):
                break
    except OSError:  # timed out (SOCKET_TIMEOUT_S) or reset mid-body
        raise protocol.invalid_request("The chunked request body did not arrive in full.") from None
    if total > limit:
        raise protocol.payload_too_large(limit)
    return bytes(body)


# Connections served at once (a thread each). Requests past the engine's slots and queue get
# a quick 429, so only a flood of idle or slow connections reaches this: past it a new
# connection gets a 503 at once instead of one more thread.
MAX_CONNECTIONS = 1024


# File descriptors kept for what is not a connection (libraries, model files, log, sockets the
# runtime opens), when the process's limit caps the connections.
FD_RESERVE = 128


def connection_limit() -> int:
    """How many connections `serve` can hold: MAX_CONNECTIONS, unless the process's open-file
    limit leaves fewer. Raises the soft limit to the hard one first (most systems start
    processes at 1024, which MAX_CONNECTIONS connections alone would use up: then accept()
    fails before the 503 can be sent)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            target = MAX_CONNECTIONS + 2 * FD_RESERVE if hard == resource.RLIM_INFINITY else hard
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
            soft = max(soft, target)
        except (OSError, ValueError):
            pass
    return max(1, min(MAX_CONNECTIONS, soft - FD_RESERVE))


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck client never blocks shutdown
    allow_reuse_address = True
    # socketserver's default listen backlog is 5: in a burst of 40 clients some connections were
    # reset or timed out before the accept loop reached them. Queue them (the kernel caps this
    # at net.core.somaxconn); past the engine's queue they get a 429, not a dead socket.
    request_queue_size = socket.SOMAXCONN
    max_connections = MAX_CONNECTIONS

    def server_activate(self) -> None:
        super().server_activate()
        self._open, self._open_lock = 0, threading.Lock()
        self._fd_warned = 0.0

    def get_request(self) -> Any:
        try:
            return super().get_request()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                # Out of file descriptors: the pending connection stays queued and the listening
                # socket readable, so socketserver would retry at once, in a busy loop. Wait a
                # little for connections to close instead.
                now = time.monotonic()
                if now - self._fd_warned > 10:
                    self._fd_warned = now
                    log.warning("out of file descriptors (%s): new connections wait; raise "
                                "the limit (ulimit -n) or lower the number of clients", e)
                time.sleep(0.05)
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            full = self._open >= self.max_connections
            self._open += not full
        if full:
            log.warning("%d connections open: refused one from %s with a 503",
                        self.max_connections, client_address[0])
            _refuse_busy(request, self.max_connections)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        """An exception that escaped the handler, in the log rather than on stderr: a client that
        times out or drops the connection before its request is read (no app has run, so there
        is nobody to answer) is one line; anything else keeps its traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, TimeoutError):
            log.warning("client %s sent no complete request in time: connection closed",
                        client_address[0])
        elif isinstance(exc, ConnectionError):
            log.info("client %s dropped the connection: %s", client_address[0], exc)
        else:
            log.exception("error handling a request from %s", client_address[0])


def _refuse_busy(sock: socket.socket, limit: int) -> None:
    """Answer 503 without reading the request (on the accept thread: never block it)."""
    body = json.dumps(protocol.too_many_connections(limit).to_dict()).encode()
    head = (b"HTTP/1.0 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
    try:
        sock.setblocking(False)
        sock.send(head + body)  # a few hundred bytes: the socket's buffer takes them at once
        # Unread request bytes would make close() send a reset, which can beat the answer.
        while sock.recv(65536):
            pass
    except OSError:
        pass


# Seconds a connection may sit without sending or taking a byte: a client that announces a body
# and never sends it, or stops reading a stream, frees its thread (and a stream's rows) after
# this instead of holding them for ever. Generating a reply sends nothing for a while and does
# not count: the clock runs only inside a socket read or write.
SOCKET_TIMEOUT_S = 60.0
# Seconds a client has to send its whole request (line, headers, body) once connected: the
# per-read timeout alone lets a client that trickles a byte now and then hold its connection,
# and enough of them every connection (MAX_CONNECTIONS), for ever.
REQUEST_DEADLINE_S = 120.0


class _ErrorLog:
    """wsgiref's error stream, into the log: a client timing out (SOCKET_TIMEOUT_S) is one
    warning line, anything else keeps its traceback."""

    def __init__(self, timeout: float) -> None:
        self._text, self._timeout = "", timeout

    def write(self, text: str) -> None:
        self._text += text

    def flush(self) -> None:
        text, self._text = self._text.strip(), ""
        if text.splitlines() and text.splitlines()[-1].startswith("TimeoutError"):
            log.warning("client stopped reading or sending for %g s: connection closed",
                        self._timeout)
        elif text:
            log.error("%s", text)


class RequestHandler(WSGIRequestHandler):
    """wsgiref's handler with what it leaves out (module docstring); one request per
    connection."""

    request_deadline = REQUEST_DEADLINE_S

    def setup(self) -> None:
        super().setup()
        self._deadline = threading.Timer(self.request_deadline, self._request_too_slow)
        self._deadline.daemon = True
        self._deadline.start()

    def _request_too_slow(self) -> None:
        log.warning("client %s did not send its request within %g s: connection closed",
                    self.client_address[0], self.request_deadline)
        try:
            self.connection.shutdown(socket.SHUT_RDWR)  # the blocked read returns at once
        except OSError:
            pass

    def handle(self) -> None:
        self._body_read = False
        super().handle()
        self._discard_unread_body()

    def _body_was_read(self) -> None:
        self._body_read = True
        self._deadline.cancel()  # the reply is not bound by the request deadline

    def _discard_unread_body(self) -> None:
        """A reply sent before the body was read (401, 404, 405, 415, ...): read the body and
        drop it, as for a 413, so that a client still sending it (http.client sends it all before
        reading) does not get a reset, which can beat the reply, instead of the reply."""
        if self._body_read or not hasattr(self, "headers"):
            return
        if self.headers.get("Expect", "").lower() == "100-continue" and not getattr(
                self, "_continued", False):
            return  # the client waits for a 100 Continue, and sends nothing without it
        length = content_length({"CONTENT_LENGTH": self.headers.get("Content-Length", "")})
        if length:
            _discard(self.rfile, length)

    def finish(self) -> None:
        self._deadline.cancel()
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # the app logs one line per request itself

    def get_stderr(self) -> _ErrorLog:
        return _ErrorLog(self.timeout)

    def get_environ(self) -> dict[str, Any]:
        environ = super().get_environ()
        environ[CLIENT_GONE] = partial(socket_closed, self.connection)
        environ[REQUEST_READ] = self._body_was_read
        if self.headers.get("Content-Type") is None:
            environ["CONTENT_TYPE"] = ""  # wsgiref fills in text/plain; say it was missing
        # An HTTP/1.1 client that asks before sending its body (curl does above 1 MiB) would
        # otherwise wait a second for this answer; http.server sends it only when it speaks 1.1.
        expect = self.headers.get("Expect", "").lower()
        if expect == "100-continue" and self.request_version >= "HTTP/1.1":
            environ[SEND_CONTINUE] = self._send_continue
        return environ

    def _send_continue(self) -> None:
        if not getattr(self, "_continued", False):
            self._continued = True
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if len(set(self.headers.get_all("Content-Length", []))) > 1:  # RFC 9112 6.3: ambiguous
            self.send_error(HTTPStatus.BAD_REQUEST, "Conflicting Content-Length headers")
            return False
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None
                   ) -> None:
        """Requests http.server refuses before the app runs (a malformed request line, too many
        or too long headers, a URL over 64 KiB) get an OpenAI error object too, not HTML."""
        short = self.responses.get(code, ("Error", ""))[0]
        body = json.dumps(protocol.http_error(code, f"{message or short}.").to_dict()).encode()
        log.warning("refused %r: %d %s", getattr(self, "requestline", "")[:200], code,
                    message or short)
        if getattr(self, "request_version", "HTTP/0.9") in ("HTTP/0.9", ""):
            # An unparsable request line leaves http.server at HTTP/0.9, which sends a bare body
            # without a status line; no such client exists, a broken one needs the status.
            self.request_version = "HTTP/1.0"
        self.close_connection = True
        self.send_response(code, short)
        self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if getattr(self, "command", None) != "HEAD":
            self.wfile.write(body)


def make_server(app: Callable, host: str, port: int, *,
                socket_timeout: float = SOCKET_TIMEOUT_S,
                request_deadline: float = REQUEST_DEADLINE_S,
                max_connections: int = MAX_CONNECTIONS) -> ThreadingWSGIServer:
    handler = type("Handler", (RequestHandler,),
                   {"timeout": socket_timeout, "request_deadline": request_deadline})
    # An IPv6 address (--host ::1, --host ::) needs an IPv6 socket; socketserver makes IPv4 ones.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("Server", (ThreadingWSGIServer,),
                        {"address_family": family, "max_connections": max_connections})
    server = server_class((host, port), handler)
    server.set_app(app)
    return server
