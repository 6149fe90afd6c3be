"""Test helpers: free ports, waiting on conditions, the inbox as io-nodes and app-nodes use it,
and a Socket.IO client that records events."""

import socket
import time

import gevent
import gevent.event
import requests
import websocket

from siocluster import Config
from siocluster.inbox import Inbox
from siocluster.recovering import RecoveringClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive free ports (the runner gives app-nodes a run)."""
    for _ in range(100):
        first = free_port()
        if first + count < 65536 and all(_is_free(first + n) for n in range(1, count)):
            return first
    raise RuntimeError(f"no {count} consecutive free ports found")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_until(predicate, timeout=5.0, interval=0.01, message="condition not met"):
    """Wait for ``predicate()`` to be true (it is re-checked as other greenlets run)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} within {timeout}s")
        gevent.sleep(interval)


def inbox_of(redis_client, keys) -> Inbox:
    """The cluster's inbox, with the default bounds."""
    return Inbox(redis_client, keys, Config())


def enqueue(redis_client, keys, *envelopes):
    """Push envelopes to their clients' queues in one script call, as an io-node pushes a
    batch (each client's token to the ready list when its queue was empty); returns the
    positions refused."""
    return inbox_of(redis_client, keys).push([(e.kind, e.sid, e.encode()) for e in envelopes])


def enqueue_raw(redis_client, keys, sid, *raws, kind="event"):
    """Push raw strings or bytes (malformed data, say) to client ``sid``'s queue, as if an
    io-node had pushed them as its messages."""
    return inbox_of(redis_client, keys).push([(kind, sid, raw) for raw in raws])


def inbox_messages(redis_client, keys) -> int:
    """Messages in all the clients' queues, waiting or being handled."""
    return inbox_of(redis_client, keys).size()[0]


def hold(redis_client, keys, processing, clients=10_000, per_client=16):
    """Take the waiting clients into a processing list as an app-node's take does (for a
    test to play the app-node that then died, or lost the take's reply); returns their
    sids, in the order taken."""
    taken, _ = inbox_of(redis_client, keys).take_waiting(processing, clients, per_client)
    return [group.sid for group in taken]


def hold_listener(io_node):
    """Hold an io-node's listener between two reads of the command streams, so that one read
    finds everything the test writes meanwhile; returns the gate that lets it read."""
    direct = io_node.readers[0].direct
    real_call = direct.call
    gate, waiting = gevent.event.Event(), gevent.event.Event()

    def call(*args):
        if args[0] == "XREAD":
            waiting.set()
            gate.wait(10)
        return real_call(*args)

    direct.call = call
    assert waiting.wait(5), "the io-node's listener did not read"
    return gate


def handshake(io_node, origin=None, host=None):
    """The first request of a polling client, as a browser sends it; returns the response."""
    headers = {"Origin": origin} if origin else {}
    if host:
        headers["Host"] = host
    return requests.get(f"http://127.0.0.1:{io_node.address[1]}/socket.io/",
                        params={"EIO": "4", "transport": "polling"}, headers=headers,
                        timeout=5)


def websocket_handshake(io_node, origin, host=None):
    """A websocket handshake as a browser sends it; returns the HTTP status."""
    options = {"host": host} if host else {}
    try:
        ws = websocket.create_connection(
            f"ws://127.0.0.1:{io_node.address[1]}/socket.io/?EIO=4&transport=websocket",
            origin=origin, timeout=5, **options)
    except websocket.WebSocketBadStatusException as exc:
        return exc.status_code
    try:
        return 101 if ws.recv().startswith("0{") else "upgraded, then closed"
    finally:
        ws.close()


class EventClient:
    """A real python-socketio client that keeps every event it receives, in order. It
    speaks connection-state recovery as the official client does (`RecoveringClient`):
    the offset that ends each event is kept, not recorded."""

    def __init__(self, **kwargs):
        kwargs.setdefault("reconnection", False)
        self.sio = RecoveringClient(**kwargs)
        self.events = []               # (namespace, event, args)
        self._arrived = gevent.event.Event()
        self.sio.on("*", self._record, namespace="*")

    def _record(self, event, namespace, *args):
        self.events.append((namespace, event, list(args)))
        self._arrived.set()

    def connect_to(self, io_node, transport="websocket", namespaces=None, auth=None):
        host, port = io_node.address[:2]
        self.sio.connect(f"http://127.0.0.1:{port}", transports=[transport],
                         namespaces=namespaces, auth=auth, wait_timeout=5)
        return self

    @property
    def sid(self):
        return self.sio.get_sid("/")

    def received(self, event, namespace="/"):
        return [args for ns, name, args in self.events if name == event and ns == namespace]

    def expect(self, event, count=1, namespace="/", timeout=5.0):
        """Wait until ``count`` ``event``s have arrived; returns the args of each."""
        deadline = time.monotonic() + timeout
        while len(self.received(event, namespace)) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"expected {count} {event!r} on {namespace}, got "
                                     f"{self.received(event, namespace)}; all: {self.events}")
            self._arrived.clear()
            if len(self.received(event, namespace)) < count:
                self._arrived.wait(remaining)
        return self.received(event, namespace)

    def call(self, event, *args, namespace="/", timeout=5.0):
        """Emit with an ack and return the ack's arguments as a list."""
        answer = gevent.event.AsyncResult()
        self.sio.emit(event, args[0] if len(args) == 1 else tuple(args) if args else None,
                      namespace=namespace, callback=lambda *a: answer.set(list(a)))
        return answer.get(timeout=timeout)

    def close(self):
        try:
            self.sio.disconnect()
        except Exception:
            pass
        # after a connection the server dropped, engineio's client leaves its websocket open
        ws = getattr(self.sio.eio, "ws", None)
        if ws is not None:
            ws.shutdown()
