"""The io-node's listening server: gevent's WSGI server with gevent-websocket, bounded.

`IoHttpServer` is what `IoNode.start_server` runs (and so ``python -m siocluster.ionode``).
Beyond gevent's own server it

- holds at most ``max_connections`` connections at once, ``max_connections_per_address``
  of them from one client address: the address the connection comes from, since a header
  such as ``X-Forwarded-For`` is the client's to write (behind a reverse proxy every client
  has the proxy's address: raise that cap to ``max_connections`` there). A connection past
  either cap gets an HTTP 503 saying so and is closed at once; under TLS it is closed with
  no answer, so no TLS handshake is spent on it. Refusals are logged about once a minute
  per address (and once a minute when the io-node is full), never once per connection;
- gives a client ``handshake_timeout`` seconds to send each request's line and headers,
  the TLS handshake included: a client dribbling its headers byte by byte, or one that
  connects and says nothing, is closed then, as is a keep-alive connection left idle;
- serves https and wss with ``certfile`` (and ``keyfile``, unless the key is in the same
  PEM file), loaded as the server is made so that a wrong path stops it at once;
- sends each write at once (``TCP_NODELAY``, as gunicorn and Node's http server do).
  Otherwise Nagle's algorithm holds a frame back while the client has not yet acknowledged
  the last one, and a client that delays its acknowledgement (Linux waits up to 40 ms)
  delays the frame as long: a p99 delivery latency of 40 ms at a load of 1,100 messages/s
  on the example chat, 3 ms with it (BENCHMARKS.md).

Under gunicorn (`siocluster.wsgi`) gunicorn's own server runs instead: its
``--worker-connections`` bounds the connections and ``--certfile`` serves TLS.
"""

import collections
import logging
import socket
import time

import gevent
import gevent.pool
from gevent import pywsgi
from gevent import ssl as gevent_ssl
from geventwebsocket.handler import WebSocketHandler

from . import defaults
from .errors import ConfigError

LOG_INTERVAL = 60.0     # seconds during which one address's refusals are logged once
REFUSALS_AT_ONCE = 100  # refused connections answered with a 503 at once; more are closed
REFUSAL_GRACE = 1.0     # seconds a refused client has to read its 503
FULL = "this io-node holds as many connections as it may: try another, or again shortly"
TOO_MANY = "too many connections from your address: close some first"

logger = logging.getLogger("siocluster.io-node")


def tls_context(certfile: str, keyfile=None) -> gevent_ssl.SSLContext:
    """A server's TLS context with the certificate chain of ``certfile`` (PEM) and the key
    of ``keyfile``, or a `ConfigError` naming the files when they cannot be loaded."""
    context = gevent_ssl.create_default_context(gevent_ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except OSError as exc:          # a missing file, or not a certificate and its key
        raise ConfigError(f"CERTFILE {certfile!r}, KEYFILE {keyfile!r}: cannot load the "
                          f"certificate and its private key ({exc})") from None
    return context


class Handler(WebSocketHandler):
    """gevent-websocket's handler, with a deadline on each request's line and headers."""

    deadline = None

    def handle_one_request(self):
        # pywsgi reads a request with no time limit of its own
        self.deadline = deadline = gevent.Timeout.start_new(self.server.handshake_timeout)
        try:
            return super().handle_one_request()
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            logger.debug("%s sent no whole request in %ss: closed", self.client_address,
                         self.server.handshake_timeout)
            return None             # the connection is closed
        finally:
            deadline.close()

    def read_request(self, raw_requestline):
        try:
            return super().read_request(raw_requestline)
        finally:
            self.deadline.close()   # the application's time (a websocket's life) is its own


class IoHttpServer(pywsgi.WSGIServer):
    """gevent's ``WSGIServer`` for an io-node (see the module).

    :param listener: ``(host, port)`` or a listening socket.
    :param application: the WSGI application, an `IoNode`.
    :param max_connections: connections held at once.
    :param max_connections_per_address: of those, from one client address.
    :param handshake_timeout: seconds to send a request's line and headers.
    :param certfile: a PEM certificate (chain) to serve https and wss with.
    :param keyfile: its PEM private key, unless it is in ``certfile``.

    Other keyword arguments are ``WSGIServer``'s (its ``log`` is off by default).
    """

    handler_class = Handler

    def __init__(self, listener, application, *,
                 max_connections: int = defaults.MAX_CONNECTIONS,
                 max_connections_per_address: int = defaults.MAX_CONNECTIONS_PER_ADDRESS,
                 handshake_timeout: float = defaults.HANDSHAKE_TIMEOUT,
                 certfile=None, keyfile=None, **kwargs):
        if keyfile and not certfile:
            raise ConfigError("KEYFILE is set but CERTFILE is not: set both to serve TLS")
        if certfile:
            # the TLS handshake happens on the first read, under the request's deadline
            kwargs.update(ssl_context=tls_context(certfile, keyfile),
                          do_handshake_on_connect=False)
        kwargs.setdefault("log", None)
        super().__init__(listener, application, **kwargs)
        self.max_connections = max_connections
        self.max_connections_per_address = max_connections_per_address
        self.handshake_timeout = handshake_timeout
        self.connections = 0
        self.by_address = collections.Counter()
        self.refusals = gevent.pool.Pool(REFUSALS_AT_ONCE)   # 503 answers being written
        self.logged = {}                    # what was refused -> when it was last logged
        self.logged_since = time.monotonic()

    def do_handle(self, sock, address):
        # called by the accept loop, in gevent's hub: nothing here may block
        host = address[0] if isinstance(address, tuple) else str(address)
        if self.connections >= self.max_connections:
            return self._refuse(sock, host, FULL, None)
        if self.by_address[host] >= self.max_connections_per_address:
            return self._refuse(sock, host, TOO_MANY, host)
        self.connections += 1
        self.by_address[host] += 1
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass    # a connection already reset: its handler finds out as it reads
        super().do_handle(sock, address)

    def do_close(self, sock, address):
        # called once the connection's handling ended, however it ended
        try:
            super().do_close(sock, address)
        finally:
            host = address[0] if isinstance(address, tuple) else str(address)
            self.connections -= 1
            self.by_address[host] -= 1
            if self.by_address[host] <= 0:
                del self.by_address[host]

    def _refuse(self, sock, host: str, reason: str, key) -> None:
        now = time.monotonic()
        if now - self.logged_since >= LOG_INTERVAL:
            # forgotten every interval, so that a flood from many addresses cannot grow it
            self.logged.clear()
            self.logged_since = now
        if key not in self.logged:
            self.logged[key] = now
            logger.warning("refused a connection from %s: %s (%d connections held, %d from "
                           "that address; MAX_CONNECTIONS %d, MAX_CONNECTIONS_PER_ADDRESS %d); "
                           "more such refusals are not logged for a minute", host, reason,
                           self.connections, self.by_address[host], self.max_connections,
                           self.max_connections_per_address)
        if self.ssl_enabled or self.refusals.full():
            # no TLS handshake spent on it; nor more answers at once than the pool holds,
            # so a flood of refused connections cannot grow the io-node either
            sock.close()
        else:
            self.refusals.spawn(answer_refused, sock, reason)


def answer_refused(sock, reason: str) -> None:
    """Answer a refused connection with an HTTP 503 and close it, within `REFUSAL_GRACE`."""
    body = reason.encode()
    try:
        with gevent.Timeout(REFUSAL_GRACE, False):
            sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                         b"Retry-After: 5\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            sock.shutdown(socket.SHUT_WR)
            # read what the client sent until it closes: closing with its request unread
            # would reset the connection, and the reset may destroy the answer on its way
            while sock.recv(4096):
                pass
    except OSError:
        pass
    finally:
        sock.close()
