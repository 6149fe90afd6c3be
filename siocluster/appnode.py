"""The app-node: runs the application's handlers on messages popped from the inbox.

The application is an `App`, written like a python-socketio server::

    app = siocluster.App()

    @app.on("say")
    def say(sid, data):
        app.emit("said", data, to=app.get_session(sid)["room"])
        return {"ok": True}                      # the client's ack

An `AppNode` runs it with ``workers`` greenlets. One at a time waits on the inbox: a
blocking ``BLMOVE`` into this app-node's processing list with, in the same round trip, a
script taking as many more as there are idle workers (up to `TAKE_MORE`). Each message
taken goes to a free worker; a worker whose handlers never yield handles the ones left in
turn, then writes all the commands they made and drops them from the processing list in
one round trip, while handlers that wait run side by side. Each message goes to exactly one
app-node. A handler that raises is logged with its envelope;
the message is tried again (its own commands dropped, the other messages of its batch
unaffected), and after ``max_attempts`` it goes to the dead-letter list.

Run it with ``python -m siocluster.appnode package.module:app``.
"""

if __name__ == "__main__":  # an entry point: patch before anything imports socket or ssl
    from gevent import monkey

    monkey.patch_all()

import collections
import contextlib
import functools
import importlib
import logging
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

import gevent
import gevent.event
import gevent.local
import gevent.lock
from redis.exceptions import NoScriptError
from socketio import Namespace
from socketio import exceptions as sio_exceptions

from .envelope import (
    Envelope,
    args_to_data,
    data_to_args,
    dumps,
    encode_batch,
    loads,
    new_id,
    pack_args,
    unpack_args,
)
from .node import REDIS_DOWN, Backoff, Node, require_gevent_patch
from .reaper import Reaper, requeue

RESERVED_EVENTS = ("connect", "disconnect", "no-client")
NOT_HANDLED = object()
SEEN_CLIENTS = 100_000   # sids an app-node remembers (for `no-client` and routing)
# Messages a worker takes at once when more wait, besides one: one round trip to take them
# and one to write all their commands halves the app-node's CPU per message under load,
# while a batch stays short enough (a few ms of handlers) not to delay its first acks.
TAKE_MORE = 15

# Move up to ARGV[1] messages from the inbox to a processing list, as BLMOVE does one, in
# one script: a crash leaves each either in the inbox or in the processing list, where the
# reaper finds it. KEYS: inbox, processing. Returns the messages, oldest first, then how
# many still wait in the inbox.
_TAKE = """
local taken = {}
for i = 1, tonumber(ARGV[1]) do
  local raw = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not raw then
    break
  end
  taken[#taken + 1] = raw
end
taken[#taken + 1] = redis.call('LLEN', KEYS[1])
return taken
"""


class CallTimeout(sio_exceptions.TimeoutError, TimeoutError):
    """`App.call` got no answer in time (both python-socketio's and Python's TimeoutError)."""


class App:
    """A Socket.IO application for app-nodes, with python-socketio's handler API.

    Handlers: ``@app.event``, ``@app.on(event, namespace=...)``, catch-alls ``'*'``, and the
    events ``connect(sid, environ, auth)`` (return False or raise ``ConnectionRefusedError``
    to refuse), ``disconnect(sid, reason)`` and ``no-client(sid, client_info)`` (the first
    message this app-node sees of a client whose connect it did not handle).

    Everything else (`emit`, `enter_room`, `get_session`, ...) works once an `AppNode`
    runs the app, or has been made for it to send from another process.
    """

    def __init__(self):
        self.handlers: Dict[str, Dict[str, Callable]] = {}
        self.namespace_handlers: Dict[str, Namespace] = {}
        self.node: Optional[AppNode] = None
        # the app-node running the current handler: one App may run in several app-nodes
        self._running = gevent.local.local()

    # ---- handlers ---------------------------------------------------------------------------

    def on(self, event: str, handler: Optional[Callable] = None, namespace: Optional[str] = None):
        """Register a handler, as a decorator or called with the handler."""
        namespace = namespace or "/"

        def register(func):
            self.handlers.setdefault(namespace, {})[event] = func
            return func
        return register(handler) if handler else register

    def event(self, *args, **kwargs):
        """Decorator: the function's name is the event name (``@app.event`` or
        ``@app.event(namespace='/chat')``)."""
        if len(args) == 1 and not kwargs and callable(args[0]):
            return self.on(args[0].__name__)(args[0])

        def register(func):
            return self.on(func.__name__, *args, **kwargs)(func)
        return register

    def handler_for(self, event: str, namespace: str, args: tuple) -> Tuple[Optional[Callable],
                                                                             tuple]:
        """python-socketio's resolution order: namespace and event, namespace catch-all,
        any-namespace and event, any-namespace catch-all."""
        handlers = self.handlers.get(namespace)
        if handlers:
            if event in handlers:
                return handlers[event], args
            if event not in RESERVED_EVENTS and "*" in handlers:
                return handlers["*"], (event, *args)
        handlers = self.handlers.get("*")
        if handlers:
            if event in handlers:
                return handlers[event], (namespace, *args)
            if event not in RESERVED_EVENTS and "*" in handlers:
                return handlers["*"], (event, namespace, *args)
        # then a class-based namespace, as python-socketio does; `no-client` is `on_no_client`
        handler = self.namespace_handlers.get(namespace)
        if handler is None and "*" in self.namespace_handlers:
            handler, args = self.namespace_handlers["*"], (namespace, *args)
        if handler is not None:
            return functools.partial(handler.trigger_event, event.replace("-", "_")), args
        return None, args

    def register_namespace(self, namespace_handler: Namespace) -> None:
        """Register a class-based namespace: an instance of a ``socketio.Namespace`` subclass
        whose ``on_<event>`` methods handle its namespace's events (as in python-socketio)."""
        if not isinstance(namespace_handler, Namespace):
            raise ValueError("register_namespace() takes an instance of a socketio.Namespace "
                             "subclass")
        namespace_handler._set_server(self)
        self.namespace_handlers[namespace_handler.namespace] = namespace_handler

    def start_background_task(self, target: Callable, *args, **kwargs):
        """Run ``target(*args, **kwargs)`` in a greenlet; returns it (python-socketio's API)."""
        return gevent.spawn(target, *args, **kwargs)

    def sleep(self, seconds: float = 0) -> None:
        """Sleep cooperatively; in a handler, what it emitted so far is sent first (a long
        handler's progress reaches clients as python-socketio's would)."""
        self.flush()
        gevent.sleep(seconds)

    def flush(self) -> None:
        """Send the commands the running handler made so far now, not when it returns
        (emits are otherwise sent together, in order, as the handler returns). In a
        connect handler it waits: the client is let in only when the handler returns."""
        node = getattr(self._running, "node", None) or self.node
        if node is None:
            return
        envelope = getattr(node._ctx, "envelope", None)
        if envelope is None or envelope.kind != "connect":
            node.flush()

    # ---- commands ---------------------------------------------------------------------------

    def _node(self) -> "AppNode":
        node = getattr(self._running, "node", None)
        if node is not None:
            return node
        if self.node is None:
            raise RuntimeError("this App is not attached to an app-node: run it with "
                               "`python -m siocluster.appnode module:app`, or make "
                               "`AppNode(app, config)` first")
        return self.node

    def emit(self, event: str, data: Any = None, to=None, room=None, skip_sid=None,
             namespace: Optional[str] = None, callback: Optional[Callable] = None,
             ignore_queue: bool = False) -> None:
        """Emit to one client (its sid), a room (channel), a list of rooms, or everyone in
        the namespace when ``to`` is None; ``skip_sid`` is a sid or a list of sids.
        (``ignore_queue`` is accepted for python-socketio's sake: every emit goes through
        Redis here.)"""
        to = to if to is not None else room
        if callback is not None:
            if not isinstance(to, str):
                raise ValueError("a callback needs one client: pass its sid as `to`")
            node = self._node()
            node.flush()
            node.spawn(node.call_back, callback, event, data, to, namespace)
            return
        command = {"m": "emit", "ns": namespace or "/", "event": event,
                   **pack_args(data_to_args(data))}
        if to is not None:
            command["to"] = to
        if skip_sid is not None:
            command["skip"] = skip_sid
        node = self._node()
        node.command(command, node.known_node(to) if isinstance(to, str) else None)

    def send(self, data: Any, to=None, room=None, skip_sid=None,
             namespace: Optional[str] = None, callback: Optional[Callable] = None,
             ignore_queue: bool = False) -> None:
        """Emit a ``message`` event."""
        self.emit("message", data, to=to, room=room, skip_sid=skip_sid, namespace=namespace,
                  callback=callback)

    def call(self, event: str, data: Any = None, to=None, sid=None,
             namespace: Optional[str] = None, timeout: Optional[float] = None,
             ignore_queue: bool = False) -> Any:
        """Emit to one client and wait for its answer (raises `CallTimeout`)."""
        sid = to if to is not None else sid
        if not isinstance(sid, str):
            raise ValueError("call() needs the sid of one client as `to`")
        return args_to_data_or_none(self._node().call_args(event, data, sid, namespace, timeout))

    def enter_room(self, sid: str, room: str, namespace: Optional[str] = None) -> None:
        self._node().room_command("enter_room", sid, room, namespace or "/")

    def leave_room(self, sid: str, room: str, namespace: Optional[str] = None) -> None:
        self._node().room_command("leave_room", sid, room, namespace or "/")

    def close_room(self, room: str, namespace: Optional[str] = None) -> None:
        node = self._node()
        node.state.close_room(namespace or "/", room)
        node.command({"m": "close_room", "ns": namespace or "/", "room": room}, None)

    def rooms(self, sid: str, namespace: Optional[str] = None) -> List[str]:
        """The rooms of a client, its own sid room included (as python-socketio)."""
        return [sid, *self._node().state.rooms(sid)]

    def disconnect(self, sid: str, namespace: Optional[str] = None,
                   ignore_queue: bool = False) -> None:
        node = self._node()
        node.command({"m": "disconnect", "ns": namespace or "/", "sid": sid},
                     node.known_node(sid, lookup=True))

    # ---- sessions and cluster state ---------------------------------------------------------

    @property
    def redis(self):
        """The app-node's redis-py client, for the application's own state."""
        return self._node().redis

    def key(self, *parts: str) -> str:
        """A Redis key for the application's own data, under the cluster's prefix."""
        return ":".join((self._node().keys.prefix, "app", *parts))

    def get_session(self, sid: str, namespace: Optional[str] = None) -> dict:
        return self._node().state.get_session(sid)

    def save_session(self, sid: str, session: dict, namespace: Optional[str] = None) -> None:
        self._node().state.save_session(sid, session)

    @contextlib.contextmanager
    def session(self, sid: str, namespace: Optional[str] = None):
        """``with app.session(sid) as session:`` reads, then saves what you changed."""
        session = self.get_session(sid)
        yield session
        self.save_session(sid, session)

    def clients(self, namespace: Optional[str] = None) -> List[dict]:
        """The connected clients across the cluster: sid, namespace, node, info."""
        return self._node().state.clients(namespace)

    def client(self, sid: str) -> Optional[dict]:
        return self._node().state.client(sid)

    def client_info(self, sid: Optional[str] = None) -> Optional[dict]:
        """The client info that came with the message being handled (what the io-node's
        `get_client_info` returned for it, with whatever io-node code added since the
        connect), for the handler's client or ``sid``; for another client, or outside a
        handler, the info stored at its connect."""
        node = self._node()
        envelope = getattr(node._ctx, "envelope", None)
        if envelope is not None and sid in (None, envelope.sid):
            return envelope.client
        record = node.state.client(sid) if sid is not None else None
        return record["info"] if record else None

    def delivery(self) -> Tuple[str, int]:
        """``(message id, attempt)`` of the message being handled. Delivery is at least
        once: the id stays the same when a message is handled again (its handler raised, or
        its app-node died), and ``attempt`` counts the deliveries before (0 the first time),
        so a handler can be idempotent."""
        envelope = getattr(self._node()._ctx, "envelope", None)
        if envelope is None:
            raise RuntimeError("delivery() tells about the message being handled: call it "
                               "inside a handler")
        return envelope.id, envelope.attempt

    def count(self, namespace: Optional[str] = None) -> int:
        return self._node().state.count(namespace)

    def room_members(self, room: str, namespace: Optional[str] = None) -> List[str]:
        """The sids in a room across every io-node."""
        return self._node().state.room_members(namespace or "/", room)

    def room_clients(self, room: str, namespace: Optional[str] = None) -> List[dict]:
        return self._node().state.room_clients(namespace or "/", room)


def args_to_data_or_none(args: list) -> Any:
    return args_to_data(args) if args else None


class AppNode(Node):
    """Runs an `App` on the inbox.

    :param app: the `App` (or ``"module:attr"`` naming it).
    :param config: a `Config` or a mapping of its keys; ``workers`` greenlets pop at once.
    :param redis: a redis-py client to use instead of one built from the config.

    ::

        node = AppNode(app, {"REDIS_URL": url}).start()
        ...
        node.stop()          # finishes the messages in flight, takes no new ones
    """

    role = "app-node"

    def __init__(self, app, config=None, redis=None):
        super().__init__(config, redis)
        self.app = load_app(app) if isinstance(app, str) else app
        self.app.node = self
        self.processing = self.keys.processing(self.id)
        self._ctx = gevent.local.local()
        self._seen: OrderedDict[str, str] = OrderedDict()   # sid -> io-node, LRU
        self.handled = 0
        self.reaper = Reaper(self)
        self._take = self.redis.register_script(_TAKE)
        self._taking = gevent.lock.Semaphore()   # one worker waits on the inbox at a time
        self._more = False       # the last round trip saw messages waiting in the inbox
        self._ready = collections.deque()   # taken, not started: for the next free worker
        self._busy = 0           # workers running handlers
        self._inflight: Dict[str, int] = {}   # raw envelopes the workers hold right now
        # after a Redis blip: None, True (look at the processing list), or the set of
        # messages no worker held at the first look (moved back if still unheld at the next)
        self._recover_due = None

    def start(self):
        require_gevent_patch("app-node")
        self.check_redis()
        super().start()
        for n in range(self.config.workers):
            self.spawn_loop(self._work_step, f"worker-{n}")
        self.spawn_loop(self._reap_step, "reaper")
        self.logger.info("app-node %s started with %d workers", self.id, self.config.workers)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Take no new messages, finish the ones in flight (at most ``timeout`` seconds),
        give back any still unfinished, and deregister."""
        self.stopping.set()
        if self._busy:
            self.logger.info("app-node %s: finishing %d message(s) in flight", self.id,
                             self._busy)
        self.join(timeout)
        try:
            self._give_back_ready()
            left = self._give_back_all()
        except REDIS_DOWN:
            # still registered: once our heartbeat lapses the reaper hands them over
            self.logger.warning("app-node %s stopped without Redis: the reaper will hand its "
                                "unfinished messages to other app-nodes", self.id)
            return
        if left:
            self.logger.warning("app-node %s: %d handler(s) still running after %.1fs; their "
                                "messages went back to the inbox", self.id, left, timeout)
        super().stop(0.1)

    def _give_back_all(self) -> int:
        """Every message left in our processing list (its handler was killed) goes back."""
        left = self.redis.lrange(self.processing, 0, -1)
        requeue(self.redis, self.keys, self.processing, left, node=self.id,
                max_attempts=self.config.max_attempts, script=self.reaper._move,
                error=f"app-node {self.id} stopped before its handler finished")
        return len(left)

    # ---- the loop ---------------------------------------------------------------------------

    def _work_step(self):
        first = self._next_message()
        if first is None:
            return
        self._busy += 1
        try:
            self.handle_batch([first])
        finally:
            self._busy -= 1

    def _next_message(self) -> Optional[str]:
        """The next message for this worker: one taken already and not started, else
        the first of a take (the rest wait in `_ready` for this and idle workers)."""
        while not self._ready:
            with self._taking:
                if self._ready:
                    break        # another worker's take while this one waited its turn
                if self.stopping.is_set():
                    return None
                raws = self._take_messages()
                if not raws:
                    return None
                # registered before anything can yield, so `_recover` never takes them
                for raw in raws:
                    self._inflight[raw] = self._inflight.get(raw, 0) + 1
                if self.stopping.is_set():
                    # popped while stop() waited: not ours to start any more
                    self._give_back(raws)
                    return None
                self._ready.extend(raws[1:])
                return raws[0]
        return self._ready.popleft()

    def _give_back_ready(self) -> None:
        """Messages taken and not started by any worker go back to the inbox."""
        if self._ready:
            unstarted, self._ready = list(self._ready), collections.deque()
            self._give_back(unstarted)

    def _release(self, raws) -> None:
        """Messages finished or given back are no longer held by this process."""
        for raw in raws:
            count = self._inflight.get(raw, 0)
            if count > 1:
                self._inflight[raw] = count - 1
            else:
                self._inflight.pop(raw, None)

    def _take_messages(self) -> List[str]:
        """Take messages into the processing list: as many as there are idle workers
        (all of `TAKE_MORE` + 1 while a backlog waits), in one round trip: a blocking
        ``BLMOVE`` for the first and, pipelined behind it, the take script for the rest.
        One worker at a time waits on the inbox, so messages that arrive together are taken
        together (with many workers each blocked on ``BLMOVE``, Redis would hand a burst
        out one message per worker, each with round trips of its own). While the last
        round trip saw more waiting, no blocking pop is needed."""
        keys = (self.keys.inbox, self.processing)
        if self._more:
            *raws, waiting = self._take(keys=keys, args=[TAKE_MORE + 1])
            self._redis_back()
            self._more = waiting > 0
            if raws:
                return raws
        wanted = min(TAKE_MORE + 1, self.config.workers - self._busy)
        if wanted <= 1:
            raw = self.redis.blmove(*keys, self.config.pop_timeout, "RIGHT", "LEFT")
            self._redis_back()
            return [] if raw is None else [raw]
        pipe = self.redis.pipeline(transaction=False)
        pipe.blmove(*keys, self.config.pop_timeout, "RIGHT", "LEFT")
        # by sha: redis-py would ask SCRIPT EXISTS in a round trip of its own first
        pipe.evalsha(self._take.sha, 2, *keys, wanted - 1)
        first, taken = pipe.execute(raise_on_error=False)
        if isinstance(first, Exception):
            raise first
        self._redis_back()
        if isinstance(taken, NoScriptError):
            # Redis restarted or flushed its scripts: load it for the next take
            self.redis.script_load(_TAKE)
            taken = [1]
        elif isinstance(taken, Exception):
            raise taken
        *raws, waiting = taken
        self._more = waiting > 0
        return raws if first is None else [first, *raws]

    def _give_back(self, raws: List[str]) -> None:
        """Messages taken but not started go back to the front of the inbox, in order."""
        requeue(self.redis, self.keys, self.processing, raws[::-1], node=self.id,
                max_attempts=self.config.max_attempts, count_attempt=False,
                error="", script=self.reaper._move)
        self._release(raws)

    def _reap_step(self):
        period = self.config.heartbeat_interval / 2
        started = time.monotonic()
        self.stopping.wait(period)
        if self.stopping.is_set():
            return
        if time.monotonic() - started > period + self.config.heartbeat_interval:
            # this process stalled (CPU starved, a long synchronous call): nodes living in
            # it could not heartbeat either, so give them a round before judging anyone
            return
        self._recover()
        self.reaper.step()

    def _redis_back(self) -> None:
        was_down = self._redis_down_since is not None
        super()._redis_back()
        if was_down:
            self._recover_due = True

    def _recover(self) -> None:
        """After a Redis blip, give back the messages of our processing list that no worker
        holds: a pop whose reply was lost with the connection never reached a worker."""
        if self._recover_due is None:
            return
        unheld = {raw for raw in self.redis.lrange(self.processing, 0, -1)
                  if raw not in self._inflight}
        if self._recover_due is True:
            # a pop's reply may be on its way to a worker right now: look again next round
            self._recover_due = unheld or None
            return
        orphans, self._recover_due = unheld & self._recover_due, None
        requeue(self.redis, self.keys, self.processing, list(orphans), node=self.id,
                max_attempts=self.config.max_attempts, count_attempt=False, error="",
                script=self.reaper._move)
        if orphans:
            self.logger.warning("app-node %s: %d message(s) popped while Redis went away went "
                                "back to the inbox", self.id, len(orphans))

    def handle(self, raw: str) -> None:
        """Handle one raw envelope taken from the inbox into the processing list."""
        self.handle_batch([raw])

    def handle_batch(self, raws: List[str]) -> None:
        """Handle raw envelopes taken from the inbox into the processing list, oldest first,
        one after the other; then write all they left behind in one round trip. A handler
        that waits (`App.flush`, `App.sleep`, `App.call`) first sends what the messages
        before it left and gives the ones after it back to the inbox, so none wait on it."""
        done: List[Finish] = []
        rest = list(raws)
        self._ctx.done, self._ctx.rest = done, rest
        try:
            # stop() waits for what is in flight: what is not started yet goes back
            while not self.stopping.is_set():
                if not rest:
                    # messages taken meanwhile that no idle worker took up (handlers that
                    # never yield leave them all to this one): handled here, written with
                    # the rest in one round trip
                    if len(done) > TAKE_MORE or not self._ready:
                        break
                    rest.append(self._ready.popleft())
                done.append(self._handle_one(rest.pop(0)))
            self._finish(done)
        finally:
            self._ctx.done = self._ctx.rest = None
        for finish in done:
            if finish.handled:
                self.handled += 1
            if finish.forget is not None:
                self._seen.pop(finish.forget.sid, None)
        self._release(finish.raw for finish in done)
        if rest:
            self._give_back(rest)

    def _handle_one(self, raw: str) -> "Finish":
        """Run one message's handler; returns what it leaves to write."""
        try:
            envelope = Envelope.decode(raw)
        except Exception as exc:     # MessageError, or a field of the wrong type
            self.logger.error("app-node %s: malformed message moved to %s: %s (%.200r)",
                              self.id, self.keys.dead, exc, raw)
            return Finish(raw, dead={"error": f"malformed: {exc}", "raw": raw})
        self.app._running.node = self
        self._ctx.envelope = envelope
        self._ctx.batch = []
        self._ctx.refused = False
        try:
            self.dispatch(envelope)
        except REDIS_DOWN as exc:
            # not the message's fault: again later, without counting an attempt
            self._redis_lost("handler", exc)
            return Finish(raw, retry=envelope.encode())
        except Exception as exc:
            self.logger.exception("app-node %s: handler failed on %s %r of %s (attempt %d): %s",
                                  self.id, envelope.kind, envelope.event, envelope.sid,
                                  envelope.attempt + 1, envelope.encode()[:500])
            # the handler's commands are dropped: a retry would send them again
            return self._retry(raw, envelope, f"{exc.__class__.__name__}: {exc}")
        finally:
            batch, self._ctx.batch, self._ctx.envelope = self._ctx.batch, None, None
        gone = envelope.kind == "disconnect" or self._ctx.refused
        return Finish(raw, batch, forget=envelope if gone else None, handled=True)

    def _finish(self, done: List["Finish"]) -> None:
        """Write what handled messages left behind, retrying while Redis is unreachable:
        the handlers ran, so their commands wait here until Redis takes them."""
        if not done:
            return
        backoff = Backoff()
        while True:
            try:
                self._finish_once(done)
            except REDIS_DOWN as exc:
                self._redis_lost("finish", exc)
                gevent.sleep(backoff.next())
                continue
            self._redis_back()
            return

    def _finish_once(self, done: List["Finish"], batch=()) -> None:
        """One round trip: the handlers' commands (then ``batch``, the running handler's),
        the state of clients that left, the messages off the processing list, and whether
        more messages wait."""
        pipe = self.redis.pipeline(transaction=False)
        self._write_commands(pipe, [f.batch for f in done] + [batch])
        for finish in done:
            if finish.forget is not None:
                # only now: the disconnect handler could still read the client's rooms and
                # session
                forget = finish.forget
                self.state.forget_client(forget.sid, forget.namespace, forget.node, pipe=pipe)
            if finish.dead is not None:
                pipe.lpush(self.keys.dead, dumps({**finish.dead, "ts": time.time(),
                                                  "app_node": self.id}))
            if finish.retry is not None:
                pipe.lpush(self.keys.inbox, finish.retry)
            pipe.lrem(self.processing, 1, finish.raw)
        pipe.llen(self.keys.inbox)
        self._more = pipe.execute()[-1] > 0

    def _retry(self, raw: str, envelope: Envelope, error: str) -> "Finish":
        envelope.attempt += 1
        if envelope.attempt >= self.config.max_attempts:
            self.logger.error("app-node %s: message %s failed %d times, moved to %s",
                              self.id, envelope.id, envelope.attempt, self.keys.dead)
            return Finish(raw, dead={"error": error, "raw": envelope.encode()})
        return Finish(raw, retry=envelope.encode())

    # ---- dispatch ---------------------------------------------------------------------------

    def dispatch(self, envelope: Envelope) -> None:
        ns, sid = envelope.namespace, envelope.sid
        app = self.app
        if envelope.kind == "connect":
            self._remember(sid, envelope.node)
            ok, error = self._connect(envelope)
            verdict = {"m": "verdict", "id": envelope.id, "ok": ok, "sid": sid, "ns": ns}
            if not ok:
                verdict["error"] = error
                self._ctx.refused = True
            # the verdict goes first: the io-node lets the client in before the handler's emits
            self._ctx.batch.insert(0, (envelope.node, verdict))
            return
        if sid not in self._seen:
            self._remember(sid, envelope.node)
            handler, args = app.handler_for("no-client", ns, (sid, envelope.client))
            if handler is not None:
                handler(*args)
        else:
            self._seen.move_to_end(sid)
        if envelope.kind == "disconnect":
            handler, args = app.handler_for("disconnect", ns, (sid, envelope.reason))
            if handler is not None:
                try:
                    handler(*args)
                except TypeError:
                    handler(*args[:-1])    # the older disconnect(sid) signature
            return
        handler, args = app.handler_for(envelope.event, ns, (sid, *envelope.args))
        if handler is None:
            self.logger.debug("app-node %s: no handler for %r in %s", self.id, envelope.event, ns)
            return
        result = handler(*args)
        if envelope.ack:
            self.command({"m": "ack", "id": envelope.id, **pack_args(data_to_args(result))},
                         envelope.node)

    def _connect(self, envelope: Envelope):
        handler, args = self.app.handler_for(
            "connect", envelope.namespace, (envelope.sid, envelope.environ, envelope.auth))
        if handler is None:
            return True, None
        try:
            try:
                result = handler(*args)
            except TypeError:
                if envelope.auth is not None:
                    raise
                result = handler(*args[:-1])   # connect(sid, environ)
        except sio_exceptions.ConnectionRefusedError as exc:
            return False, exc.error_args
        except ConnectionRefusedError as exc:
            return False, {"message": str(exc) or "Connection refused by server"}
        if result is False:
            return False, {"message": "Connection rejected by server"}
        return True, None

    def _remember(self, sid: str, node: str) -> None:
        self._seen[sid] = node
        self._seen.move_to_end(sid)
        if len(self._seen) > SEEN_CLIENTS:
            self._seen.popitem(last=False)

    # ---- commands ---------------------------------------------------------------------------

    def known_node(self, sid: str, lookup: bool = False) -> Optional[str]:
        """The io-node holding ``sid`` if this app-node knows (or, with ``lookup``, finds)
        it; None sends a command to every io-node."""
        node = self._seen.get(sid)
        if node is None and lookup:
            node = self.state.client_node(sid)
        return node

    def command(self, command: dict, node: Optional[str]) -> None:
        """Send a command: inside a handler it joins the handler's batch, else it goes now."""
        batch = getattr(self._ctx, "batch", None)
        if batch is not None:
            batch.append((node, command))
        else:
            pipe = self.redis.pipeline(transaction=False)
            self._write_commands(pipe, [[(node, command)]])
            pipe.execute()

    def flush(self) -> None:
        """Send the current handler's commands now (before a call() waits, say), with what
        the messages handled before it in its batch left; the messages after it go back to
        the inbox for other workers, rather than wait behind a handler that waits (so do
        the ones taken and not started, when no other worker is free to start them)."""
        rest = getattr(self._ctx, "rest", None)
        if rest:
            left, rest[:] = rest[:], []
            self._give_back(left)
        if self._busy >= self.config.workers:
            self._give_back_ready()
        done = getattr(self._ctx, "done", None) or []
        batch = getattr(self._ctx, "batch", None) or []
        if done:
            self._finish_once(done, batch)
            self.handled += sum(1 for finish in done if finish.handled)
            for finish in done:
                if finish.forget is not None:
                    self._seen.pop(finish.forget.sid, None)
            self._release(finish.raw for finish in done)
            del done[:]
        elif batch:
            pipe = self.redis.pipeline(transaction=False)
            self._write_commands(pipe, [batch])
            pipe.execute()
        del batch[:]

    def _write_commands(self, pipe, batches: List[List[Tuple[Optional[str], dict]]]) -> None:
        """Write the commands of handlers (a batch for each, in the order they ran) in one
        XADD per stream. A handler's commands meant for one io-node's clients go to that
        node's stream, any addressed more widely all to the stream every io-node reads: so
        each io-node gets a handler's commands in order, and handlers' in the order they
        ran."""
        groups: Dict[str, List[dict]] = {}
        for batch in batches:
            if not batch:
                continue
            if any(node is None for node, _ in batch):
                groups.setdefault(self.keys.commands, []).extend(c for _, c in batch)
            else:
                for node, command in batch:
                    groups.setdefault(self.keys.node_commands(node), []).append(command)
        maxlen = self.config.stream_maxlen
        for stream, commands in groups.items():
            pipe.xadd(stream, {"b": encode_batch(commands)}, maxlen=maxlen, approximate=True)

    def room_command(self, method: str, sid: str, room: str, namespace: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        if method == "enter_room":
            self.state.enter_room(sid, namespace, room, pipe)
        else:
            self.state.leave_room(sid, namespace, room, pipe)
        node = self._seen.get(sid)
        if node is None:
            pipe.hget(self.keys.clients, sid)
        results = pipe.execute()
        if node is None and results[-1]:
            node = loads(results[-1]).get("node")
        self.command({"m": method, "ns": namespace, "sid": sid, "room": room}, node)

    def call_back(self, callback: Callable, event: str, data: Any, sid: str,
                  namespace: Optional[str]) -> None:
        """`App.emit` with a callback: wait for the client's answer in a greenlet of its own;
        no answer in time is logged, as python-socketio drops a callback never called."""
        try:
            answer = self.call_args(event, data, sid, namespace, None)
        except CallTimeout:
            self.logger.warning("app-node %s: %s did not answer %r in time; its callback "
                                "is not called", self.id, sid, event)
            return
        try:
            callback(*answer)
        except Exception:
            self.logger.exception("app-node %s: callback for %r failed", self.id, event)

    def call_args(self, event: str, data: Any, sid: str, namespace: Optional[str],
                  timeout: Optional[float]) -> list:
        """Emit to one client and wait for its ack; returns the answer's arguments."""
        self.flush()
        timeout = self.config.call_timeout if timeout is None else timeout
        reply = self.keys.reply(new_id())
        command = {"m": "call", "ns": namespace or "/", "sid": sid, "event": event,
                   "reply": reply, **pack_args(data_to_args(data))}
        pipe = self.redis.pipeline(transaction=False)
        self._write_commands(pipe, [[(self.known_node(sid, lookup=True), command)]])
        pipe.execute()
        deadline = time.monotonic() + timeout
        # short blocking pops keep each one under the socket timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CallTimeout(f"client {sid} did not answer {event!r} in {timeout}s")
            got = self.redis.blpop(reply, timeout=min(remaining, self.config.pop_timeout))
            if got is not None:
                return unpack_args(loads(got[1]))


class Finish:
    """What a handled message leaves to write: its handler's commands, a client to forget,
    a retry or a dead-letter record; then it leaves the processing list."""

    __slots__ = ("raw", "batch", "dead", "retry", "forget", "handled")

    def __init__(self, raw: str, batch=(), dead: Optional[dict] = None,
                 retry: Optional[str] = None, forget: Optional[Envelope] = None,
                 handled: bool = False):
        self.raw, self.batch, self.dead, self.retry = raw, batch, dead, retry
        self.forget, self.handled = forget, handled


def load_app(path: str) -> App:
    """Import ``package.module:attr`` (``attr`` defaults to ``app``)."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"app-node: cannot import {module_name!r}: {exc}")
    app = getattr(module, attr or "app", None)
    if not isinstance(app, App):
        raise SystemExit(f"app-node: {path!r} is not a siocluster.App "
                         f"(found {type(app).__name__})")
    return app


def main(argv=None) -> None:
    import argparse

    from .config import Config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m siocluster.appnode",
                                     description="Run an app-node: the app's handlers on the "
                                                 "cluster's inbox.")
    parser.add_argument("app", help="the App to run, as package.module:attr")
    config, args = Config.load(argv, parser=parser)
    node = AppNode(args.app, config)
    try:
        node.start()
    except RuntimeError as exc:      # Redis unreachable, a wrong password: already says what to do
        raise SystemExit(f"app-node: {exc}")
    node.run_until_signalled("draining")


if __name__ == "__main__":
    # the canonical module's main, not this __main__ copy: its classes would be strangers
    # to the ones the application imports from siocluster
    from siocluster.appnode import main as _main

    _main()
