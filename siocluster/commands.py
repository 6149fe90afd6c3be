"""What an app-node sends back: the running handler's commands, routed, batched, and calls.

A handler runs inside a `HandlerContext` (`current()` returns it): the message it handles
and the commands it made so far. Its commands are written together, in order, when it
returns (the app-node writes them in the round trip that finishes the message); outside a
handler a command goes at once. A command for one client goes to the stream of the io-node
holding it when this app-node knows which (it saw the client's messages); anything else
goes to every io-node. `Commands.call` emits to one client and waits for its answer on a
reply list::

    commands = Commands(streams, state, keys, call_timeout=10.0, pop_timeout=1.0, node_id=id)
    commands.send(emit_command("said", ["hi"], "/", to=room))
"""

import logging
import time
from collections import OrderedDict
from typing import Callable, List, Optional

import gevent.local
from socketio import exceptions as sio_exceptions

from .envelope import Envelope, call_command, loads, new_id, room_command, unpack_args
from .state import ClusterState, Keys
from .streams import CommandStreams, Routed

SEEN_CLIENTS = 100_000   # sids an app-node remembers (for `no-client` and routing)


class CallTimeout(sio_exceptions.TimeoutError, TimeoutError):
    """`App.call` got no answer in time (both python-socketio's and Python's TimeoutError)."""


class HandlerContext:
    """The message the handler running in this greenlet handles, and what it did so far.

    ``node`` is the app-node running it, ``envelope`` the message, ``turn`` the client's
    turn it is part of (its session; None when an app-node was not taken through the
    inbox), ``commands`` the ``(io-node or None, command)`` pairs it made, ``refused``
    whether it refused a connect.
    """

    __slots__ = ("node", "envelope", "turn", "commands", "refused", "writes")

    def __init__(self, node, envelope: Envelope, turn=None):
        self.node, self.envelope, self.turn = node, envelope, turn
        self.commands: List[Routed] = []
        self.refused = False
        self.writes: Optional[Writes] = None


class Writes:
    """Redis writes a handler leaves for the round trip that finishes its message
    (`App.writes`): any redis-py command, recorded, then sent on that round trip's
    pipeline before the handler's commands. Their replies are not returned."""

    __slots__ = ("calls",)

    def __init__(self):
        self.calls: List[tuple] = []

    def __getattr__(self, name: str):
        if name.startswith("_") or name in ("execute", "watch", "multi", "pipeline"):
            raise AttributeError(f"app.writes() has no {name!r}: its writes are sent when the "
                                 "message is finished; use app.redis to run commands now")

        def record(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return self
        return record

    def replay(self, pipe) -> None:
        """Add the recorded writes to ``pipe``."""
        for name, args, kwargs in self.calls:
            getattr(pipe, name)(*args, **kwargs)


_local = gevent.local.local()


def current() -> Optional[HandlerContext]:
    """The context of the handler running in this greenlet, or None outside handlers."""
    return getattr(_local, "context", None)


def enter(context: Optional[HandlerContext]) -> Optional[HandlerContext]:
    """Make ``context`` this greenlet's (None: none); returns the one it replaces."""
    previous = current()
    _local.context = context
    return previous


class Commands:
    """Routes and sends the commands of one app-node, and waits for clients' answers.

    :param streams: the cluster's `CommandStreams`.
    :param state: the cluster's `ClusterState` (room writes, where a client is).
    :param keys: the cluster's `Keys`.
    :param call_timeout: seconds `call` waits by default.
    :param pop_timeout: the longest single blocking pop, kept under the socket timeout.
    """

    def __init__(self, streams: CommandStreams, state: ClusterState, keys: Keys,
                 call_timeout: float, pop_timeout: float, node_id: str = "", logger=None):
        self.streams, self.state, self.keys = streams, state, keys
        self.node_id = node_id
        self.call_timeout, self.pop_timeout = call_timeout, pop_timeout
        self.logger = logger or logging.getLogger("siocluster.app-node")
        self._seen: OrderedDict[str, str] = OrderedDict()   # sid -> io-node, LRU
        # with connection-state recovery a client may come back on another io-node, and
        # what it missed is read back from the stream every io-node reads: commands for
        # one client go there too (acks and verdicts still go to the io-node that asked)
        self.route_by_node = True

    # ---- where clients are ------------------------------------------------------------------

    def remember(self, sid: str, node: str) -> None:
        """``sid`` is held by io-node ``node``."""
        self._seen[sid] = node
        self._seen.move_to_end(sid)
        if len(self._seen) > SEEN_CLIENTS:
            self._seen.popitem(last=False)

    def seen(self, sid: str) -> bool:
        """Whether this app-node saw ``sid``'s connect or an earlier message of it."""
        if sid in self._seen:
            self._seen.move_to_end(sid)
            return True
        return False

    def forget(self, sid: str) -> None:
        self._seen.pop(sid, None)

    def node_of(self, sid: str, lookup: bool = False) -> Optional[str]:
        """The io-node holding ``sid`` if this app-node knows (or, with ``lookup``, finds)
        it; None sends a command to every io-node."""
        if not self.route_by_node:
            return None
        node = self._seen.get(sid)
        if node is None and lookup:
            node = self.state.client_node(sid)
        return node

    # ---- sending ----------------------------------------------------------------------------

    def send(self, command: dict, node: Optional[str] = None) -> None:
        """Send a command: inside a handler it joins the handler's commands, else it goes
        now. ``node`` is the io-node it is for (None: every io-node)."""
        context = current()
        if context is not None:
            context.commands.append((node, command))
        else:
            self.streams.send([(node, command)])

    def room(self, method: str, sid: str, room: str, namespace: str) -> None:
        """``enter_room`` or ``leave_room``: written to the cluster state at once (the
        handler reads its own writes), applied by the io-node holding the client."""
        pipe = self.state.redis.pipeline(transaction=False)
        if method == "enter_room":
            self.state.enter_room(sid, namespace, room, pipe)
        else:
            self.state.leave_room(sid, namespace, room, pipe)
        node = self._seen.get(sid) if self.route_by_node else None
        if node is None and self.route_by_node:
            pipe.hget(self.keys.shard(sid).clients, sid)
        results = pipe.execute()
        if node is None and self.route_by_node and results[-1]:
            node = loads(results[-1]).get("node")
        self.send(room_command(method, sid, room, namespace), node)

    def call(self, event: str, args: list, sid: str, namespace: str,
             timeout: Optional[float] = None) -> list:
        """Emit to one client at once and wait for its ack; returns the answer's arguments
        (raises `CallTimeout`). Send the handler's earlier commands first."""
        timeout = self.call_timeout if timeout is None else timeout
        reply = self.keys.reply(new_id())
        context = current()
        turn = context.turn if context is not None else None
        # with several shards, on the stream the handler's earlier commands went to
        self.streams.send([(self.node_of(sid, lookup=True),
                            call_command(event, args, sid, namespace, reply))],
                          turn.lane.inbox.keys if turn is not None and turn.lane else None)
        deadline = time.monotonic() + timeout
        # short blocking pops keep each one under the socket timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CallTimeout(f"client {sid} did not answer {event!r} in {timeout}s")
            got = self.state.redis.blpop(reply, timeout=min(remaining, self.pop_timeout))
            if got is not None:
                return unpack_args(loads(got[1]))

    def call_back(self, callback: Callable, event: str, args: list, sid: str,
                  namespace: str) -> None:
        """An emit with a callback: wait for the client's answer (run it in a greenlet of
        its own); no answer in time is logged, as python-socketio drops a callback never
        called."""
        try:
            answer = self.call(event, args, sid, namespace)
        except CallTimeout:
            self.logger.warning("app-node %s: %s did not answer %r in time; its callback "
                                "is not called", self.node_id, sid, event)
            return
        try:
            callback(*answer)
        except Exception:
            self.logger.exception("app-node %s: callback for %r failed", self.node_id, event)
