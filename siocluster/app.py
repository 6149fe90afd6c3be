"""The application: handlers written like python-socketio's, run by app-nodes.

    app = siocluster.App()

    @app.on("say")
    def say(sid, data):
        app.emit("said", data, to=app.get_session(sid)["room"])
        return {"ok": True}                      # the client's ack

An `App` holds the handlers; an `AppNode` (``python -m siocluster.appnode module:app``)
takes client messages from the inbox and calls them. Inside a handler, `current()` tells
which message is being handled; what the handler emits is sent in order when it returns.
"""

import contextlib
import functools
import logging
from typing import Any, Callable, Dict, List, Optional, Tuple

import gevent
from socketio import Namespace

from .commands import CallTimeout, Writes, current
from .dispatch import HANDLER_FAILED, UNHANDLED_NAMESPACE, Dispatch
from .engine import bind_namespace
from .envelope import (
    RESERVED_EVENTS,
    args_to_data,
    close_room_command,
    data_to_args,
    disconnect_command,
    emit_command,
)
from .tasks import ClusterTask, check_mode, start_cluster_task
from .tasks import task_name as task_name_of

__all__ = ["App", "CallTimeout", "current", "HANDLER_FAILED", "UNHANDLED_NAMESPACE"]

NOT_AN_IO_NODE = (
    "siocluster: this process runs a siocluster.App, which holds no Socket.IO connections: "
    "io-nodes do. `socketio.WSGIApp(sio, app)` cannot serve /socket.io/ here. Run io-nodes "
    "(`python -m siocluster.ionode --port 8081`, or `python -m siocluster.pages module:app "
    "--port 8081` to serve this WSGI app's pages beside Socket.IO) and app-nodes "
    "(`python -m siocluster.appnode module:sio`); see docs/porting.md.")


class App(Dispatch):
    """A Socket.IO application for app-nodes, with python-socketio's handler API.

    Handlers: ``@app.event``, ``@app.on(event, namespace=...)``, catch-alls ``'*'``, and the
    events ``connect(sid, environ, auth)`` (return False or raise ``ConnectionRefusedError``
    to refuse), ``disconnect(sid, reason)`` and ``no-client(sid, client_info)`` (the first
    message this app-node sees of a client whose connect it did not handle).

    Everything else (`emit`, `enter_room`, `get_session`, ...) works once an `AppNode`
    runs the app, or has been made for it to send from another process.

    ``background_tasks``: ``"node"`` (the default) runs each `start_background_task` in the
    process that calls it, as python-socketio does (so once per app-node); ``"cluster"``
    runs each once per cluster (`start_cluster_task`).
    """

    #: handlers and tasks run in greenlets, as with python-socketio's ``async_mode="gevent"``
    async_mode = "gevent"

    def __init__(self, async_handlers: bool = False, background_tasks: str = "node"):
        #: False (the default): a client's messages are handled one at a time, in the order
        #: they arrived, across all app-nodes. True: the messages of a client taken together
        #: run side by side, as python-socketio's ``async_handlers`` runs each in a task.
        self.async_handlers = async_handlers
        self.background_tasks = check_mode(background_tasks)
        self.pending_tasks: List[ClusterTask] = []   # cluster tasks started before a node
        self.handlers: Dict[str, Dict[str, Callable]] = {}
        self.namespace_handlers: Dict[str, Namespace] = {}
        # the app-node this App sends through outside handlers; inside one, the app-node
        # running it (one App may run in several app-nodes)
        self.node = None
        self.admin = None           # the Admin UI's server side, once `instrument` ran

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

    def has_handler(self, event: str, namespace: str) -> bool:
        """Whether ``event`` has a handler of its own, not only a catch-all."""
        if any(event in self.handlers.get(ns, {}) for ns in (namespace, "*")):
            return True
        handler = self.namespace_handlers.get(namespace, self.namespace_handlers.get("*"))
        return handler is not None and callable(
            getattr(handler, "on_" + event.replace("-", "_"), None))

    def instrument(self, auth=None, mode: str = "development", read_only: bool = False,
                   server_id: Optional[str] = None, namespace: str = "/admin",
                   server_stats_interval: float = 2):
        """Serve the Socket.IO Admin UI cluster-wide, as python-socketio's ``instrument``
        does for one process: see `siocluster.admin.AdminUI`. Returns it."""
        from .admin import AdminUI

        self.admin = AdminUI(self, auth, mode, read_only, server_id, namespace,
                             server_stats_interval)
        return self.admin

    def register_namespace(self, namespace_handler: Namespace) -> None:
        """Register a class-based namespace: an instance of a ``socketio.Namespace`` subclass
        whose ``on_<event>`` methods handle its namespace's events (as in python-socketio)."""
        if not isinstance(namespace_handler, Namespace):
            raise ValueError("register_namespace() takes an instance of a socketio.Namespace "
                             "subclass")
        bind_namespace(namespace_handler, self)
        self.namespace_handlers[namespace_handler.namespace] = namespace_handler

    def start_background_task(self, target: Callable, *args, **kwargs):
        """Run ``target(*args, **kwargs)`` in a greenlet of this process and return it
        (python-socketio's API): on a cluster that is once per app-node that calls it.
        With ``background_tasks="cluster"`` it is `start_cluster_task` instead."""
        if self.background_tasks == "cluster":
            return self.start_cluster_task(target, *args, **kwargs)
        return gevent.spawn(target, *args, **kwargs)

    def start_cluster_task(self, target: Callable, *args, task_name: Optional[str] = None,
                           **kwargs) -> ClusterTask:
        """Run ``target(*args, **kwargs)`` once per cluster: on the app-node that holds its
        lease in Redis, the others that started it standing by to take over within
        ``NODE_TTL + HEARTBEAT_INTERVAL`` if that one dies (see `siocluster.tasks`). Its
        name (``task_name``, by default the target's module and qualified name) is what
        makes two starts the same task. Before an app-node runs this App, the task waits
        for one to start. Returns a `ClusterTask` (``join()``, ``kill()``, ``running``)."""
        task = ClusterTask(task_name or task_name_of(target), target, args, kwargs)
        context = current()
        node = context.node if context is not None and context.node.app is self else self.node
        if node is None:
            self.pending_tasks.append(task)
            return task
        return start_cluster_task(node, task)

    def handle_request(self, environ, start_response):
        """What ``socketio.WSGIApp(app)`` calls for ``/socket.io/``: an App holds no
        connections (io-nodes do), so it answers with what to run instead."""
        logging.getLogger("siocluster.app").error(NOT_AN_IO_NODE)
        start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
        return [NOT_AN_IO_NODE.encode()]

    def sleep(self, seconds: float = 0) -> None:
        """Sleep cooperatively; in a handler, what it emitted so far is sent first (a long
        handler's progress reaches clients as python-socketio's would)."""
        self.flush()
        gevent.sleep(seconds)

    def flush(self) -> None:
        """Send the commands the running handler made so far now, not when it returns
        (emits are otherwise sent together, in order, as the handler returns). In a
        connect handler it waits: the client is let in only when the handler returns."""
        context = current()
        if context is None:
            return
        if context.envelope.kind != "connect":
            context.node.flush()

    # ---- commands ---------------------------------------------------------------------------

    def _node(self):
        context = current()
        if context is not None and context.node.app is self:
            return context.node
        if self.node is None:
            raise RuntimeError("this App is not attached to an app-node: run it with "
                               "`python -m siocluster.appnode module:app`; to send from "
                               "another process (a Flask route, a script) make "
                               "`siocluster.AppNode(app, config)` there first, without "
                               "starting it (`python -m siocluster.pages` does so)")
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
            node.spawn(node.commands.call_back, callback, event, data_to_args(data), to,
                       namespace or "/")
            return
        commands = self._node().commands
        commands.send(emit_command(event, data_to_args(data), namespace or "/", to, skip_sid),
                      commands.node_of(to) if isinstance(to, str) else None)

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
        node = self._node()
        node.flush()
        answer = node.commands.call(event, data_to_args(data), sid, namespace or "/", timeout)
        return args_to_data(answer) if answer else None

    def enter_room(self, sid: str, room: str, namespace: Optional[str] = None) -> None:
        self._node().commands.room("enter_room", sid, room, namespace or "/")
        if self.admin is not None:
            self.admin.room_changed("room_joined", namespace or "/", room, sid)

    def leave_room(self, sid: str, room: str, namespace: Optional[str] = None) -> None:
        self._node().commands.room("leave_room", sid, room, namespace or "/")
        if self.admin is not None:
            self.admin.room_changed("room_left", namespace or "/", room, sid)

    def close_room(self, room: str, namespace: Optional[str] = None) -> None:
        node = self._node()
        node.state.close_room(namespace or "/", room)
        node.commands.send(close_room_command(room, namespace or "/"))

    def rooms(self, sid: str, namespace: Optional[str] = None) -> List[str]:
        """The rooms of a client, its own sid room included (as python-socketio)."""
        return [sid, *self._node().state.rooms(sid)]

    def disconnect(self, sid: str, namespace: Optional[str] = None,
                   ignore_queue: bool = False) -> None:
        node = self._node()
        if node.recovery.enabled:
            node.recovery.end_now(sid)     # away and parked: it may not come back
        node.commands.send(disconnect_command(sid, namespace or "/"),
                           node.commands.node_of(sid, lookup=True))

    def send_command(self, command: dict, node: Optional[str] = None) -> None:
        """Send a command built by one of `siocluster.envelope`'s constructors (for
        io-node code, say): in order with the handler's, or at once outside handlers."""
        self._node().commands.send(command, node)

    # ---- sessions and cluster state ---------------------------------------------------------

    @property
    def redis(self):
        """The app-node's redis-py client, for the application's own state."""
        return self._node().redis

    def writes(self):
        """Redis writes that go with the message being handled, sent in the round trip
        that finishes it, before its emits (so a client told of a change finds it made),
        and dropped with them if the handler raises: ``app.writes().rpush(key, value)``.
        Any redis-py command; replies are not returned (read with `redis`). A handler that
        only writes so costs no round trip of its own."""
        context = current()
        if context is None or context.node.app is not self:
            raise RuntimeError("app.writes() is for a handler's own writes, sent when its "
                               "message is finished: outside a handler use app.redis")
        if context.writes is None:
            context.writes = Writes()
        return context.writes

    def key(self, *parts: str) -> str:
        """A Redis key for the application's own data, under the cluster's prefix."""
        return self._node().keys.app(*parts)

    def _turn(self, sid: str):
        """The running handler's client turn when ``sid`` is its client, else None."""
        context = current()
        if context is not None and context.turn is not None and context.turn.sid == sid \
                and context.node.app is self:
            return context.turn
        return None

    def get_session(self, sid: str, namespace: Optional[str] = None) -> dict:
        """A client's session. In a handler of that client it came with the message (no
        round trip), and its handlers share it: a change is written when the message is
        finished, whether or not `save_session` was called, as python-socketio keeps it."""
        turn = self._turn(sid)
        if turn is not None:
            return turn.session()
        return self._node().state.get_session(sid)

    def save_session(self, sid: str, session: dict, namespace: Optional[str] = None) -> None:
        """Replace a client's session: in a handler of that client, written with the
        message's finish (atomically with its commands' round trip); else at once."""
        turn = self._turn(sid)
        if turn is not None:
            turn.save_session(session)
        else:
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
        context = current()
        if context is not None and sid in (None, context.envelope.sid):
            return context.envelope.client
        record = self._node().state.client(sid) if sid is not None else None
        return record["info"] if record else None

    def recovered(self) -> bool:
        """Inside the connect handler: whether the client came back as itself after losing
        its connection (connection-state recovery: the same sid, its rooms and session as
        it left them, and what it missed is sent to it), not a new client. False in other
        handlers."""
        context = current()
        if context is None:
            raise RuntimeError("recovered() tells about the message being handled: call it "
                               "inside a handler")
        return context.envelope.recovered

    def delivery(self) -> Tuple[str, int]:
        """``(message id, attempt)`` of the message being handled. Delivery is at least
        once: the id stays the same when a message is handled again (its handler raised, or
        its app-node died), and ``attempt`` counts the deliveries before (0 the first time),
        so a handler can be idempotent."""
        context = current()
        if context is None:
            raise RuntimeError("delivery() tells about the message being handled: call it "
                               "inside a handler")
        return context.envelope.id, context.envelope.attempt

    def count(self, namespace: Optional[str] = None) -> int:
        return self._node().state.count(namespace)

    def room_members(self, room: str, namespace: Optional[str] = None) -> List[str]:
        """The sids in a room across every io-node."""
        return self._node().state.room_members(namespace or "/", room)

    def room_clients(self, room: str, namespace: Optional[str] = None) -> List[dict]:
        return self._node().state.room_clients(namespace or "/", room)
