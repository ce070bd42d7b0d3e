#!/usr/bin/env python3
"""pyworker: a plain baton worker written in Python, standard library only.

baton's integration tests run this script to show that baton supervises any
binary, not only programs linked against the Rust SDK. It uses nothing but
the conventions a plain worker has (docs/design.md, "Plain workers"):

* listeners arrive at fds 3.. in the systemd socket-activation convention
  (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES);
* readiness is reported by sending READY=1 to NOTIFY_SOCKET;
* drain is a signal (SIGTERM unless --drain-signal says otherwise): stop
  accepting, close idle keep-alive connections, finish the requests in
  flight, exit 0.

Stream listeners (TCP over IPv4 or IPv6, Unix stream) serve HTTP/1.1 with
keep-alive, one thread per connection. Every response is JSON:

    GET /            {"generation": G, "pid": P}
    GET /slow?ms=N   the same, after sleeping N milliseconds
    GET /fds         the descriptors and environment the process started with
    anything else    404 {"error": "not found"}

Datagram listeners (UDP, Unix datagram) answer every datagram with
b"gen=G pid=P " + payload, sent back to the sender's address.

G is $BATON_GENERATION (0 when unset). The flags (see --help) make the worker
misbehave in the ways baton's failure tests need: crash, never become ready,
ignore the drain signal, write garbage on the worker channel, and so on.
"""

import os


def _capture_startup_fds():
    """Return {fd: (readlink target, inheritable)} for every fd open right now.

    This runs before any other import so that the report shows exactly what
    the supervisor handed over, not descriptors the worker opened itself.
    os.listdir() needs a descriptor of its own for the directory; it is closed
    again by the time we readlink() it, so it fails and is skipped (the check
    on the target catches it should it ever still be open).
    """
    own_fd_dir = f"/proc/{os.getpid()}/fd"
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            inheritable = os.get_inheritable(fd)  # i.e. FD_CLOEXEC is clear
        except OSError:
            continue
        if target != own_fd_dir:
            fds[fd] = (target, inheritable)
    return dict(sorted(fds.items()))


STARTUP_FDS = _capture_startup_fds()

# The remaining imports come after the snapshot on purpose (see above).
import argparse  # noqa: E402
import ctypes  # noqa: E402
import errno  # noqa: E402
import http  # noqa: E402
import json  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import urllib.parse  # noqa: E402
from dataclasses import dataclass  # noqa: E402

PID = os.getpid()

# The first listener fd in the systemd convention (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3

# Limits on what a client may send us.
MAX_LINE = 16 * 1024
MAX_HEADERS = 100
MAX_BODY = 1024 * 1024
MAX_SLOW_MS = 10 * 60 * 1000

# A client that stalls in the middle of sending a request is dropped after
# this long, so it cannot hold a draining worker forever.
REQUEST_TIMEOUT = 30.0

# A connection accepted but with no request yet is not an idle keep-alive
# connection: closing it would fail the client's first request, which clients
# do not retry (docs/design.md, "What counts as a failed request"). During a
# drain such a connection gets this long for its request to arrive.
FIRST_REQUEST_GRACE = 2.0

# How often a thread waiting for the first request re-checks that grace.
FIRST_REQUEST_POLL = 0.05

# How often a drain re-sends the wake signal to an accept thread that has not
# exited yet.
WAKE_RETRY = 0.02


def log(message):
    print(f"pyworker gen={GENERATION} pid={PID} {message}", file=sys.stderr, flush=True)


def _generation_from_env():
    raw = os.environ.get("BATON_GENERATION", "0") or "0"
    try:
        return int(raw)
    except ValueError:
        print(f"pyworker: BATON_GENERATION={raw!r} is not an integer; using 0",
              file=sys.stderr, flush=True)
        return 0


GENERATION = _generation_from_env()


# ---------------------------------------------------------------------------
# The startup report (GET /fds and --report)
# ---------------------------------------------------------------------------

def _enum_name(enum_type, value):
    try:
        return enum_type(value).name
    except ValueError:
        return str(value)


def _describe_socket(fd):
    """Family, type and listening state of the socket at fd, without taking it over."""
    sock = socket.socket(fileno=fd)  # detects family, type and protocol itself
    try:
        return {
            "family": _enum_name(socket.AddressFamily, sock.family),
            "type": _enum_name(socket.SocketKind, sock.type),
            "listening": bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)),
        }
    finally:
        sock.detach()  # the fd is not ours to close


def build_startup_report():
    sockets = {}
    for fd, (target, _) in STARTUP_FDS.items():
        if target.startswith("socket:"):
            try:
                sockets[str(fd)] = _describe_socket(fd)
            except OSError as error:
                sockets[str(fd)] = {"error": str(error)}
    return {
        "pid": PID,
        "listen_pid": os.environ.get("LISTEN_PID"),
        "listen_fds": os.environ.get("LISTEN_FDS"),
        "listen_fdnames": os.environ.get("LISTEN_FDNAMES"),
        "generation": GENERATION,
        "notify_socket": os.environ.get("NOTIFY_SOCKET"),
        "channel_fd": os.environ.get("BATON_CHANNEL_FD"),
        "fds": {str(fd): target for fd, (target, _) in STARTUP_FDS.items()},
        "cloexec": {str(fd): not inheritable for fd, (_, inheritable) in STARTUP_FDS.items()},
        "sockets": sockets,
    }


def write_report(path, report):
    """Write the report so that a reader never sees a partial file."""
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(report, file, indent=2)
        file.write("\n")
    os.rename(temporary, path)


# ---------------------------------------------------------------------------
# Listeners (systemd socket-activation convention) and sd_notify
# ---------------------------------------------------------------------------

class StartupError(Exception):
    """The worker cannot start; the message says why."""


@dataclass
class Listener:
    fd: int
    name: str
    sock: socket.socket

    @property
    def is_stream(self):
        return self.sock.type == socket.SOCK_STREAM

    def describe(self):
        family = _enum_name(socket.AddressFamily, self.sock.family)
        kind = _enum_name(socket.SocketKind, self.sock.type)
        return f"{self.name}@{self.fd}({family}/{kind})"


def listeners_from_environment():
    """The listeners passed at fds 3.., as sd_listen_fds_with_names() sees them."""
    count_text = os.environ.get("LISTEN_FDS")
    if not count_text:
        return []
    listen_pid = os.environ.get("LISTEN_PID")
    if listen_pid != str(PID):
        raise StartupError(f"LISTEN_PID={listen_pid!r} but our pid is {PID}: "
                           "these listeners were meant for another process")
    try:
        count = int(count_text)
    except ValueError:
        raise StartupError(f"LISTEN_FDS={count_text!r} is not a number") from None
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    listeners = []
    for index in range(count):
        fd = LISTEN_FDS_START + index
        name = names[index] if index < len(names) and names[index] else "unknown"
        try:
            # Never call settimeout()/setblocking() on these: O_NONBLOCK lives
            # in the open file description, which every generation shares.
            sock = socket.socket(fileno=fd)
        except OSError as error:
            raise StartupError(f"listener {name} at fd {fd}: {error}") from None
        listener = Listener(fd, name, sock)
        if sock.type not in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            raise StartupError(f"listener {listener.describe()}: unsupported socket type")
        if listener.is_stream and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise StartupError(f"listener {listener.describe()} is not listening")
        listeners.append(listener)
    return listeners


def sd_notify(message):
    """Send one datagram to $NOTIFY_SOCKET; False when there is none."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)
    return True


# ---------------------------------------------------------------------------
# Accepting on a shared listener
# ---------------------------------------------------------------------------
#
# The listening sockets are shared with the supervisor and with the other
# generations, so this worker must not touch O_NONBLOCK on them (it belongs
# to the open file description, which all of them share), nor SO_RCVTIMEO
# (socket-wide as well). Whether the listener is blocking is not ours to
# choose, so the accept loop copes with both:
#
# * It poll()s the listener together with a stop pipe, so a drain wakes it.
# * After poll() says "readable", another process may take the connection
#   first. On a non-blocking listener accept then fails with EAGAIN, and we
#   poll again. On a blocking one it blocks until the next connection comes,
#   which may be never, and closing the fd does not wake a blocked accept()
#   on Linux. A drain therefore interrupts it with a signal sent to that
#   thread only (pthread_kill), repeated until the thread has exited, since a
#   signal that lands just before the thread enters accept() is lost.
# * Python's own socket.accept() retries on EINTR in every thread but the
#   main one (PEP 475), so a signal cannot interrupt it. We call accept4(2)
#   through ctypes instead, which returns EINTR to us. ctypes releases the
#   GIL around the call.
# * If the blocked accept() wins a connection after the drain began, that
#   connection is served like any other (its request is answered, with
#   Connection: close): once the kernel gave it to us, nobody else can.
#
# Datagram listeners need none of this: recvfrom(MSG_DONTWAIT) is
# non-blocking per call, without changing the shared flags.

_libc = ctypes.CDLL(None, use_errno=True)
_libc.accept4.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
_libc.accept4.restype = ctypes.c_int

# accept() errors that concern one pending connection, not the listener;
# accept(2) says to treat them like EAGAIN.
_ACCEPT_RETRY_ERRNOS = {
    errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ECONNABORTED, errno.EPROTO,
    errno.ENETDOWN, errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET,
    errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH, errno.EPERM,
}
# Resource exhaustion: wait a little and try again.
_ACCEPT_BACKOFF_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def accept_interruptibly(listen_fd):
    """accept4(2) that a signal can interrupt. Returns the new fd (CLOEXEC)."""
    fd = _libc.accept4(listen_fd, None, None, socket.SOCK_CLOEXEC)
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return fd


def choose_wake_signal(drain_signal):
    """A signal nobody else sends us, to interrupt a blocked accept()."""
    for candidate in (signal.SIGURG, signal.SIGWINCH):
        if candidate != drain_signal:
            return candidate
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------
# HTTP/1.1
# ---------------------------------------------------------------------------

# Connection states, guarded by Server.lock.
NEW = "new"    # accepted, no request received yet
IDLE = "idle"  # kept alive between requests, waiting for the next one
BUSY = "busy"  # a request is being read, handled or answered


class BadRequest(Exception):
    """The client sent something we will not parse; answer 400 and close."""


@dataclass
class Request:
    method: str
    target: str
    keep_alive: bool  # what the client asked for


class Connection:
    """One accepted stream connection, served by its own thread."""

    def __init__(self, server, sock):
        self.server = server
        self.sock = sock
        self.buffer = bytearray()  # received but not yet parsed
        self.state = NEW

    def run(self):
        try:
            while self.server.await_request(self):
                if not self._serve_one():
                    break
        except (ConnectionError, TimeoutError):
            pass  # the client went away or stalled; nothing to answer
        except Exception:  # a bug: say so, but keep the worker serving
            log("connection error:\n" + traceback.format_exc().rstrip())
        finally:
            self.server.forget(self)

    def wait_readable(self, timeout):
        """True when a recv() would not block (data, EOF or an error)."""
        if self.buffer:
            return True
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(None if timeout is None else timeout * 1000))

    # -- reading ------------------------------------------------------------

    def _fill(self):
        chunk = self.sock.recv(64 * 1024)
        self.buffer += chunk
        return bool(chunk)

    def _read_line(self):
        """One line including its terminator, or None at EOF before any byte."""
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end + 1])
                del self.buffer[:end + 1]
                return line
            if len(self.buffer) > MAX_LINE:
                raise BadRequest("line too long")
            if not self._fill():
                if self.buffer:
                    raise ConnectionResetError("EOF in the middle of a line")
                return None

    def _skip(self, length):
        while len(self.buffer) < length:
            if not self._fill():
                raise ConnectionResetError("EOF in the middle of a body")
        del self.buffer[:length]

    def _read_request(self):
        """The next request, or None when the client closed cleanly."""
        line = self._read_line()
        if line in (b"\r\n", b"\n"):  # RFC 9112 2.2: tolerate one stray CRLF
            line = self._read_line()
        if line is None:
            return None
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise BadRequest("malformed request line")
        method, target, version = parts

        headers = {}
        for _ in range(MAX_HEADERS):
            line = self._read_line()
            if line is None:
                raise ConnectionResetError("EOF in the headers")
            if line in (b"\r\n", b"\n"):
                break
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon or not name or name != name.strip():
                raise BadRequest("malformed header")
            key = name.lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        else:
            raise BadRequest("too many headers")

        if "transfer-encoding" in headers:
            raise BadRequest("request bodies must use Content-Length")
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise BadRequest("bad Content-Length") from None
        if not 0 <= length <= MAX_BODY:
            raise BadRequest("bad Content-Length")
        self._skip(length)  # no endpoint reads a body

        tokens = {token.strip().lower() for token in headers.get("connection", "").split(",")}
        if version == "HTTP/1.0":
            keep_alive = "keep-alive" in tokens
        else:
            keep_alive = "close" not in tokens
        return Request(method, target, keep_alive)

    # -- answering ----------------------------------------------------------

    def _serve_one(self):
        """Read, handle and answer one request. True to keep the connection."""
        try:
            request = self._read_request()
        except BadRequest as error:
            self._respond(400, {"error": f"bad request: {error}"}, keep_alive=False)
            return False
        if request is None:
            return False
        status, body = route(request, self.server.report)
        return self._respond(status, body, keep_alive=request.keep_alive,
                             head=request.method == "HEAD")

    def _respond(self, status, body, *, keep_alive, head=False):
        # The Connection header is decided and the connection's fate settled
        # under the server's lock, so a drain either sees this connection busy
        # (and leaves it alone: it closes after this response) or idle.
        keep_alive = self.server.may_keep_alive(keep_alive)
        payload = json.dumps(body).encode()
        reason = http.HTTPStatus(status).phrase
        head_lines = (
            f"HTTP/1.1 {status} {reason}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n"
            "\r\n"
        )
        self.sock.sendall(head_lines.encode("latin-1") + (b"" if head else payload))
        return keep_alive and self.server.settle_after_response(self)


def identity():
    return {"generation": GENERATION, "pid": PID}


def route(request, report):
    """(status, JSON body) for a request. Any method is routed by path."""
    path, _, query = request.target.partition("?")
    if path == "/":
        return 200, identity()
    if path == "/slow":
        values = urllib.parse.parse_qs(query).get("ms", ["0"])
        try:
            milliseconds = int(values[0])
        except ValueError:
            return 400, {"error": "ms must be an integer"}
        if not 0 <= milliseconds <= MAX_SLOW_MS:
            return 400, {"error": f"ms must be between 0 and {MAX_SLOW_MS}"}
        time.sleep(milliseconds / 1000)
        return 200, identity()
    if path == "/fds":
        return 200, report
    return 404, {"error": "not found"}


# ---------------------------------------------------------------------------
# The server: accept threads, datagram threads, connections, drain
# ---------------------------------------------------------------------------

class Server:
    def __init__(self, listeners, report, wake_signal):
        self.listeners = listeners
        self.report = report
        self.wake_signal = wake_signal
        self.lock = threading.Lock()
        self.connections_changed = threading.Condition(self.lock)
        self.connections = set()
        self.draining = False
        self.drain_started = 0.0
        # Written once at drain and never read, so it stays readable and
        # wakes every poll() that watches it.
        self.stop_r, self.stop_w = os.pipe()
        self.acceptors = []
        self.datagram_threads = []

    def start(self):
        for listener in self.listeners:
            if listener.is_stream:
                loop, threads = self._accept_loop, self.acceptors
            else:
                loop, threads = self._datagram_loop, self.datagram_threads
            thread = threading.Thread(target=loop, args=(listener,),
                                      name=f"listener-{listener.name}", daemon=True)
            thread.start()
            threads.append(thread)

    # -- accepting ----------------------------------------------------------

    def _poll_listener(self, listener):
        """Wait until the listener is readable; False when the drain began."""
        poller = select.poll()
        poller.register(listener.fd, select.POLLIN)
        poller.register(self.stop_r, select.POLLIN)
        ready = {fd for fd, _ in poller.poll()}
        return self.stop_r not in ready

    def _accept_loop(self, listener):
        while not self.draining and self._poll_listener(listener):
            try:
                fd = accept_interruptibly(listener.fd)
            except OSError as error:
                if error.errno in _ACCEPT_RETRY_ERRNOS:
                    continue  # another process took it, or we are being woken
                if error.errno in _ACCEPT_BACKOFF_ERRNOS:
                    log(f"accept on {listener.name}: {error}; retrying")
                    time.sleep(0.1)
                    continue
                log(f"accept on {listener.name}: {error}; no longer accepting on it")
                return
            self._serve(socket.socket(fileno=fd))

    def _serve(self, sock):
        sock.settimeout(REQUEST_TIMEOUT)  # our own socket: fine to change
        connection = Connection(self, sock)
        with self.lock:
            self.connections.add(connection)
        try:
            threading.Thread(target=connection.run, name="connection", daemon=True).start()
        except RuntimeError as error:  # cannot start a thread: drop it, stay alive
            log(f"cannot serve a connection: {error}")
            self.forget(connection)

    # -- datagrams ----------------------------------------------------------

    def _datagram_loop(self, listener):
        prefix = f"gen={GENERATION} pid={PID} ".encode()
        while self._poll_listener(listener):
            try:
                payload, sender = listener.sock.recvfrom(64 * 1024, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                continue  # another process took it
            except OSError as error:
                log(f"recvfrom on {listener.name}: {error}")
                continue
            if not sender:
                continue  # an unbound Unix datagram socket: nowhere to answer
            try:
                listener.sock.sendto(prefix + payload, sender)
            except OSError as error:
                log(f"sendto {sender!r} on {listener.name}: {error}")

    # -- connection bookkeeping (called from connection threads) -------------

    def await_request(self, connection):
        """Block until a request starts arriving on connection.

        Returns True with the connection marked busy, or False when it must
        be closed instead: it is an idle keep-alive connection and the drain
        began, or its first request did not come within the drain's grace.
        """
        first = connection.state == NEW
        while True:
            # An idle connection waits without timeout: the drain shuts it
            # down, which wakes the poll.
            readable = connection.wait_readable(FIRST_REQUEST_POLL if first else None)
            with self.lock:
                if self.draining and not first:
                    # Closed before any byte of a response on a reused
                    # connection: clients retry this (RFC 9112, 9.3.1).
                    return False
                if readable:
                    connection.state = BUSY
                    return True
                if self.draining and time.monotonic() - self.drain_started > FIRST_REQUEST_GRACE:
                    return False

    def may_keep_alive(self, client_wants_it):
        with self.lock:
            return client_wants_it and not self.draining

    def settle_after_response(self, connection):
        """After a keep-alive response: mark idle, or False if the drain began."""
        with self.lock:
            if self.draining:
                return False
            connection.state = IDLE
            return True

    def forget(self, connection):
        # Closed under the lock so that drain() never shuts down a socket
        # whose fd number was already closed and perhaps reused.
        with self.lock:
            connection.sock.close()
            self.connections.discard(connection)
            self.connections_changed.notify_all()

    # -- drain --------------------------------------------------------------

    def drain(self, reason):
        """Stop accepting, close idle connections, wait for in-flight requests."""
        with self.lock:
            self.draining = True
            self.drain_started = time.monotonic()
            for connection in self.connections:
                if connection.state == IDLE:
                    try:
                        connection.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass  # the client closed it already
            open_connections = len(self.connections)
        log(f"draining ({reason}): {open_connections} connection(s) open")
        os.write(self.stop_w, b"x")

        for thread in self.acceptors:
            while thread.is_alive():
                try:
                    signal.pthread_kill(thread.ident, self.wake_signal)
                except ProcessLookupError:
                    break  # it exited between is_alive() and the kill
                thread.join(WAKE_RETRY)
        for thread in self.datagram_threads:
            thread.join()
        # Every connection is registered by now: the accept threads are gone.
        with self.lock:
            while self.connections:
                self.connections_changed.wait()


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def parse_signal(name):
    text = name.strip().upper()
    if text.isdigit():
        return signal.Signals(int(text))
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return signal.Signals[text]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown signal {name!r}") from None


def non_negative_ms(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def parse_arguments(argv):
    parser = argparse.ArgumentParser(
        prog="pyworker",
        description="A plain baton worker (systemd listeners, sd_notify, drain on a signal).")
    parser.add_argument("--crash-at-start", action="store_true",
                        help="exit with status 3 at once, before notifying")
    parser.add_argument("--never-ready", action="store_true",
                        help="serve, but never send READY=1")
    parser.add_argument("--no-notify", action="store_true",
                        help="send nothing to NOTIFY_SOCKET (for --ready after: tests)")
    parser.add_argument("--ready-delay", type=non_negative_ms, default=0, metavar="MS",
                        help="initialise for MS milliseconds before serving and sending READY=1")
    parser.add_argument("--ignore-drain", action="store_true",
                        help="ignore the drain signal and keep serving")
    parser.add_argument("--garbage-channel", action="store_true",
                        help="write garbage to BATON_CHANNEL_FD before notifying")
    parser.add_argument("--crash-after", type=non_negative_ms, default=None, metavar="MS",
                        help="exit with status 4 MS milliseconds after becoming ready")
    parser.add_argument("--report", metavar="FILE",
                        help="write the /fds report to FILE at startup")
    parser.add_argument("--drain-signal", type=parse_signal, default=signal.SIGTERM,
                        metavar="NAME", help="the signal that starts a drain (default TERM)")
    return parser.parse_args(argv)


class SignalWaiter:
    """Lets the main thread wait for signals, whichever thread receives them.

    A Python signal handler runs only in the main thread, and only once it
    returns to Python code, but the kernel may deliver the signal to any
    thread. set_wakeup_fd() has the C-level handler write the signal number to
    a pipe from whichever thread caught it, so reading that pipe always wakes.
    """

    def __init__(self, handled_signals):
        self.read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)  # our own pipe; set_wakeup_fd needs it
        for signum in handled_signals:
            signal.signal(signum, lambda *_: None)
        signal.set_wakeup_fd(write_fd)

    def wait_for(self, wanted, timeout=None):
        """Wait for the signal wanted (None: none). False if timeout expired first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([self.read_fd], [], [], remaining)
            if not readable:
                return False
            received = os.read(self.read_fd, 512)  # one byte per signal number
            if wanted is not None and wanted in received:
                return True


def run(args):
    if args.crash_at_start:
        print("pyworker: crashing at start, as asked (--crash-at-start)",
              file=sys.stderr, flush=True)
        return 3

    report = build_startup_report()
    if args.report:
        write_report(args.report, report)

    try:
        listeners = listeners_from_environment()
    except StartupError as error:
        print(f"pyworker: {error}", file=sys.stderr, flush=True)
        return 2
    described = ",".join(listener.describe() for listener in listeners) or "none"
    log(f"listeners={described}")

    wake_signal = choose_wake_signal(args.drain_signal)
    if args.ignore_drain:
        signal.signal(args.drain_signal, signal.SIG_IGN)
        signals = SignalWaiter([wake_signal])
        drain_signal = None
    else:
        signals = SignalWaiter([wake_signal, args.drain_signal])
        drain_signal = args.drain_signal

    if args.garbage_channel:
        channel_fd = os.environ.get("BATON_CHANNEL_FD")
        if channel_fd:
            try:
                os.write(int(channel_fd), b"\x00\xffnot json at all\n")
                log(f"wrote garbage to the worker channel (fd {channel_fd})")
            except (OSError, ValueError) as error:
                log(f"--garbage-channel: cannot write to fd {channel_fd}: {error}")
        else:
            log("--garbage-channel: BATON_CHANNEL_FD is not set")

    drained_early = False
    if args.ready_delay:
        log(f"initialising for {args.ready_delay}ms before serving")
        drained_early = signals.wait_for(drain_signal, args.ready_delay / 1000)

    server = Server(listeners, report, wake_signal)
    if not drained_early:
        server.start()
        if args.never_ready or args.no_notify:
            log("serving; not sending READY=1, as asked")
        else:
            try:
                sent = sd_notify("READY=1\nSTATUS=serving\n")
                log("serving; sent READY=1" if sent else "serving; NOTIFY_SOCKET is not set")
            except OSError as error:  # like sd_notify(3) users: report it, keep serving
                log(f"serving; could not send READY=1: {error}")

        if args.crash_after is not None:
            def crash():
                log(f"crashing {args.crash_after}ms after ready, as asked (--crash-after)")
                os._exit(4)
            timer = threading.Timer(args.crash_after / 1000, crash)
            timer.daemon = True
            timer.start()

        signals.wait_for(drain_signal)  # forever with --ignore-drain

    server.drain(f"received {args.drain_signal.name}")
    log("drained; exiting 0")
    return 0


def main():
    try:
        sys.exit(run(parse_arguments(sys.argv[1:])))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
