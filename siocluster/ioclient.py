"""A connection held by an io-node, and what an io-node takes from its handshake.

`Client` is the seed's ``client``: the io-node keeps one per connected sid, with its info
(computed at connect, sent with every message) and its rate-limit bucket. The handshake
gives the environ the app's connect handler sees (`safe_environ`) and, by default, the
origins a connection is accepted from (`same_host_origins`).
"""

import time
from typing import Callable, Optional
from urllib.parse import urlsplit

SHOWN = 100   # characters of a client's input repeated back in errors and in the log


def shown(value) -> str:
    """A client's input as it may be repeated back: at most `SHOWN` characters of it (of its
    repr, when it is not a string)."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= SHOWN else text[:SHOWN] + "..."


# The part of a WSGI environ that travels to app-nodes with a connect: JSON-safe strings only.
ENVIRON_KEYS = ("REMOTE_ADDR", "REMOTE_PORT", "QUERY_STRING", "PATH_INFO", "SERVER_NAME",
                "SERVER_PORT", "SERVER_PROTOCOL", "REQUEST_METHOD")


def safe_environ(environ: dict) -> dict:
    """What of a WSGI environ travels to app-nodes with a connect."""
    return {k: v for k, v in environ.items()
            if isinstance(v, str) and (k.startswith("HTTP_") or k in ENVIRON_KEYS)}


def same_host_origins(origin: str, environ: dict) -> bool:
    """The default CORS check: an ``Origin`` on the io-node's own host, any port (the
    frontend-node on the same host, as `make run-cluster` and a reverse proxy set it up)."""
    try:
        host = urlsplit(origin).hostname
    except ValueError:
        return False
    hosts = {environ.get("HTTP_HOST", ""), environ.get("HTTP_X_FORWARDED_HOST", "")}
    hosts = {urlsplit("//" + h.split(",")[0].strip()).hostname for h in hosts if h}
    return host is not None and host in hosts


class Client:
    """A connection held by this io-node (the seed's ``client``).

    ``data`` is free for io-node code, e.g. a user id set on an ``app setUserId`` message;
    ``info`` is what `IoNode.get_client_info` computed at connect; ``pid`` its private id
    when it may come back as itself (connection-state recovery).
    """

    __slots__ = ("sid", "namespace", "eio_sid", "info", "data", "tokens", "stamp", "pid")

    def __init__(self, sid, namespace, eio_sid, info, burst):
        self.sid, self.namespace, self.eio_sid = sid, namespace, eio_sid
        self.info = info
        self.data = {}
        self.tokens = float(burst)     # rate limit: a token bucket
        self.stamp = time.monotonic()
        self.pid = None

    def take_token(self, rate: float, burst: int) -> bool:
        """Whether the client may send one more event at ``rate`` per second, ``burst``
        at once (a rate of 0 lets everything through)."""
        if not rate:
            return True
        now = time.monotonic()
        self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class ClientEvents:
    """A part of `IoNode`: the seed's io-node events (``on``/``fire``) and the client info
    sent with every message. The node provides ``hooks``, ``logger`` and ``id``."""

    def on(self, name: str, handler: Optional[Callable] = None):
        """Register ``handler(*args)`` for an io-node event such as ``'app setUserId'``."""
        def register(func):
            self.hooks.setdefault(name, []).append(func)
            return func
        return register(handler) if handler else register

    def fire(self, name: str, *args) -> None:
        for handler in self.hooks.get(name, ()):
            try:
                handler(*args)
            except Exception:
                self.logger.exception("io-node %s: %r hook failed", self.id, name)

    def get_client_info(self, client: Client) -> dict:
        """The client info sent with every message of ``client``; override to add yours."""
        return client.info

    def client_info(self, sid: str, namespace: str, environ: dict) -> dict:
        """The info computed once at connect."""
        return {"sid": sid, "namespace": namespace,
                "remote_addr": environ.get("HTTP_X_FORWARDED_FOR", "").split(",")[0].strip()
                or environ.get("REMOTE_ADDR"),
                "user_agent": environ.get("HTTP_USER_AGENT"),
                "origin": environ.get("HTTP_ORIGIN"),
                "io_node": self.id}
