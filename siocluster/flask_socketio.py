"""Flask-SocketIO's API on app-nodes: a Flask-SocketIO app moves by changing its import line.

    from flask_socketio import SocketIO, emit, join_room, ...              # before
    from siocluster.flask_socketio import SocketIO, emit, join_room, ...   # after

and by how it is started: io-nodes hold the connections, app-nodes run the handlers
(``python -m siocluster.appnode module:socketio``, or ``module:app``, the Flask app), and
``python -m siocluster.pages module:app`` serves the Flask app's pages beside Socket.IO
on io-nodes. ``socketio.run(app)`` says so.

Handlers run as Flask-SocketIO runs them: without ``sid``, inside a Flask request context
(``flask.request.sid``, ``.namespace``, ``.event``; ``flask.session``, a dict of the client's
own, kept in the cluster's session of the client and written with the message;
``copy_current_request_context``; ``current_app``); ``emit`` and ``send`` go to the sender
unless given ``to=``, ``broadcast=True``, ``include_self=False``, ``skip_sid=``. What
differs because handlers run in another process than the connection is in
docs/porting.md: ``request.environ`` holds what travels (all of it at the connect; the
client's address, user agent and origin afterwards), and a missing key says so.
"""

import functools
import logging
from typing import Callable, Optional

import flask
import flask.ctx
import socketio
from flask.sessions import SessionMixin
from socketio.exceptions import ConnectionRefusedError
from werkzeug.test import EnvironBuilder

from .app import App
from .node import REDIS_DOWN

__all__ = ["SocketIO", "Namespace", "emit", "send", "call", "join_room", "leave_room",
           "close_room", "rooms", "disconnect", "ConnectionRefusedError"]

logger = logging.getLogger("siocluster.flask_socketio")

RUN = ("socketio.run(app) runs one process that holds the connections and runs the handlers; "
       "on siocluster they run apart, sharing one Redis: run io-nodes (`python -m "
       "siocluster.pages {module}:app --port 8081` serves this Flask app's pages beside "
       "Socket.IO; `python -m siocluster.ionode --port 8081` serves Socket.IO alone) and "
       "app-nodes (`python -m siocluster.appnode {module}:socketio`); see docs/porting.md")
NO_SOCKET_IO = ("siocluster: this Flask app's Socket.IO handlers run on app-nodes, and its "
                "connections are held by io-nodes: serve it with `python -m siocluster.pages "
                "module:app` (its pages and Socket.IO on one port), or point the page's io() at "
                "an io-node; see docs/porting.md")
# Socket.IO and Engine.IO server options with a siocluster setting that does their work
IO_NODE_OPTIONS = {
    "cors_allowed_origins": "the io-nodes' CORS_ALLOWED_ORIGINS",
    "max_http_buffer_size": "the io-nodes' MAX_MESSAGE_SIZE",
    "always_connect": "the io-nodes' CONNECT_TIMEOUT_ACCEPT",
    "logger": "every node's LOG_LEVEL", "engineio_logger": "every node's LOG_LEVEL",
}


class TravelledEnviron(dict):
    """The WSGI environ of a handler on an app-node: what traveled with the client's
    messages. A key that did not travel says what to do instead of a bare KeyError."""

    def __missing__(self, key):
        raise KeyError(f"{key!r}: not in the environ that reaches app-nodes (the connect's "
                       "HTTP_* headers and request line; later events carry REMOTE_ADDR, "
                       "HTTP_USER_AGENT and HTTP_ORIGIN only). Read it in the connect handler "
                       "and keep it in the session")


class ManagedSession(dict, SessionMixin):
    """``flask.session`` in a handler: the client's own, as Flask-SocketIO manages it,
    saved in the cluster's session of the client (JSON) when the handler returns."""


class SocketIO:
    """Flask-SocketIO's ``SocketIO`` for app-nodes: ``SocketIO(app)`` or ``init_app(app)``.

    ``server`` is the `siocluster.App` it registers its handlers on (python-socketio's
    methods: ``socketio.server.enter_room(sid, room)``, ...). Options of the Socket.IO server
    itself (``cors_allowed_origins``, ``ping_timeout``, ...) belong to the io-nodes: they
    are logged as such and not applied here. ``background_tasks="cluster"`` makes
    `start_background_task` run each task once per cluster (`siocluster.tasks`).
    """

    async_mode = "gevent"

    def __init__(self, app=None, **kwargs):
        self.server = App(background_tasks=kwargs.pop("background_tasks", "node"))
        self.flask_app = None
        self.manage_session = True
        self.exception_handlers = {}
        self.default_exception_handler = None
        self.server_options = {}
        if app is not None or "message_queue" in kwargs:
            self.init_app(app, **kwargs)
        else:
            self.server_options.update(kwargs)

    @property
    def siocluster_app(self) -> App:
        """The `App` app-nodes run (`siocluster.loader.load_app` finds it here)."""
        return self.server

    def init_app(self, app, **kwargs):
        options = {**self.server_options, **kwargs}
        self.manage_session = options.pop("manage_session", self.manage_session)
        if not self.manage_session:
            raise ValueError("manage_session=False shares Flask's own session between HTTP "
                             "routes and Socket.IO handlers, which run in other processes "
                             "here: keep the default (each client's session is its own)")
        mode = options.pop("async_mode", None)
        if mode not in (None, "gevent", "threading"):
            raise ValueError(f"async_mode={mode!r}: app-nodes run handlers in greenlets "
                             "(gevent): leave it out, or say 'gevent'")
        if "client_manager" in options:
            raise ValueError("client_manager: siocluster's nodes talk through their own "
                             "Redis streams (REDIS_URL); leave it out")
        queue, channel = options.pop("message_queue", None), options.pop("channel", None)
        for key in sorted(options):     # python-socketio ignores what it does not know
            setting = IO_NODE_OPTIONS.get(key)
            logger.warning("SocketIO(%s=...) is not applied by app-nodes%s", key,
                           f": set {setting}" if setting else
                           " (a Socket.IO server option: the io-nodes' settings are in "
                           "`python -m siocluster.ionode --help`)")
        if app is not None and (queue or channel):
            logger.info("SocketIO(message_queue=..., channel=...) is not needed on app-nodes: "
                        "they talk through REDIS_URL, under PREFIX")
        if app is not None:
            if not hasattr(app, "extensions"):
                app.extensions = {}
            app.extensions["socketio"] = self
            self.flask_app = app
            app.wsgi_app = NoSocketIO(app.wsgi_app)
        elif queue:
            self._sender(queue, channel)

    def _sender(self, url: str, channel: Optional[str]) -> None:
        """Flask-SocketIO's write-only ``SocketIO(message_queue=url)`` (a process that only
        emits): an app-node for sending, not started, on Redis ``url`` under PREFIX
        ``channel`` (``SIOCLUSTER_*`` variables override both)."""
        from .appnode import AppNode
        from .config import Config

        base = {"redis_url": url, **({"prefix": channel} if channel else {})}
        AppNode(self.server, Config.from_env(base=Config(**base)))

    # ---- handlers -------------------------------------------------------------------------

    def on(self, message: str, namespace: Optional[str] = None):
        """Register a handler of ``message`` (``'*'``: a catch-all), called without sid."""
        namespace = namespace or "/"

        def decorator(handler):
            @functools.wraps(handler)
            def _handler(sid, *args):
                real_ns = namespace
                if namespace == "*":
                    real_ns, sid, args = sid, args[0], args[1:]
                if message == "*":      # the event's name comes first, then the sid
                    sid, args = args[0], (sid, *args[1:])
                return self.handle_event(handler, message, real_ns, sid, *args)

            self.server.on(message, _handler, namespace=namespace)
            return handler
        return decorator

    def on_event(self, message: str, handler: Callable, namespace: Optional[str] = None):
        self.on(message, namespace=namespace)(handler)

    def event(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]):
            return self.on(args[0].__name__)(args[0])
        return lambda handler: self.on(handler.__name__, *args, **kwargs)(handler)

    def on_error(self, namespace: Optional[str] = None):
        def decorator(exception_handler):
            if not callable(exception_handler):
                raise ValueError("exception_handler must be callable")
            self.exception_handlers[namespace or "/"] = exception_handler
            return exception_handler
        return decorator

    def on_error_default(self, exception_handler):
        if not callable(exception_handler):
            raise ValueError("exception_handler must be callable")
        self.default_exception_handler = exception_handler
        return exception_handler

    def on_namespace(self, namespace_handler):
        if not isinstance(namespace_handler, Namespace):
            raise ValueError("on_namespace() takes an instance of a subclass of "
                             "siocluster.flask_socketio.Namespace (import Namespace from "
                             "siocluster.flask_socketio, not flask_socketio)")
        namespace_handler.socketio = self
        self.server.register_namespace(namespace_handler)

    def handle_event(self, handler, message, namespace, sid, *args):
        """Run ``handler(*args)`` as Flask-SocketIO does: in a request context of the
        client, with its session, ``request.sid``, ``request.namespace``, ``request.event``."""
        if self.flask_app is None:
            raise RuntimeError("this SocketIO has no Flask app: make it with SocketIO(app) "
                               "or call socketio.init_app(app)")
        environ = self._environ(sid, message, args)
        stored = self.server.get_session(sid, namespace)
        session = ManagedSession(stored)
        if message == "connect" and not stored:
            # a new client's session starts as a copy of its Flask (cookie) session
            app = self.flask_app
            cookie = app.session_interface.open_session(app, app.request_class(environ))
            session.update(cookie or {})
        with flask.ctx.RequestContext(self.flask_app, environ, session=session):
            flask.request.sid = sid
            flask.request.namespace = namespace
            flask.request.event = {"message": message, "args": args}
            try:
                if message == "connect":
                    auth = args[1] if len(args) > 1 else None
                    try:
                        result = handler(auth)
                    except TypeError:
                        result = handler()
                else:
                    result = handler(*args)
            except (ConnectionRefusedError, *REDIS_DOWN):
                raise
            except Exception as exc:
                on_error = self.exception_handlers.get(namespace, self.default_exception_handler)
                if on_error is None:
                    raise
                result = on_error(exc)
            if dict(session) != stored:
                self.server.save_session(sid, dict(session), namespace)
            return result

    def _environ(self, sid: str, message, args) -> TravelledEnviron:
        """A WSGI environ for the client's request context: the connect's, as it traveled;
        for later events, one built from the client info that comes with each message."""
        if message == "connect" and args and isinstance(args[0], dict):
            travelled = dict(args[0])
        else:
            info = self.server.client_info(sid) or {}
            travelled = {key: info[name] for key, name in (
                ("REMOTE_ADDR", "remote_addr"), ("HTTP_USER_AGENT", "user_agent"),
                ("HTTP_ORIGIN", "origin")) if isinstance(info.get(name), str)}
        environ = EnvironBuilder(path=travelled.get("PATH_INFO", "/socket.io/"),
                                 query_string=travelled.get("QUERY_STRING", "")).get_environ()
        environ.update(travelled)
        environ["flask.app"] = self.flask_app
        return TravelledEnviron(environ)

    # ---- sending --------------------------------------------------------------------------

    def emit(self, event: str, *args, **kwargs):
        """Emit from anywhere (a handler, a route, a task): to everyone in ``namespace``
        unless ``to`` (a sid or a room) is given."""
        namespace = kwargs.pop("namespace", "/")
        to = kwargs.pop("to", None) or kwargs.pop("room", None)
        include_self = kwargs.pop("include_self", True)
        skip_sid = kwargs.pop("skip_sid", None)
        if not include_self and not skip_sid:
            skip_sid = flask.request.sid
        callback = kwargs.pop("callback", None)
        if callback is not None and flask.has_request_context() \
                and getattr(flask.request, "sid", None):
            # the client's answer runs the callback in a request context of that client
            sid, original = flask.request.sid, callback
            original_namespace = getattr(flask.request, "namespace", namespace)

            def callback(*answer):
                return self.handle_event(original, None, original_namespace, sid, *answer)
        data = args[0] if len(args) == 1 else tuple(args) if args else None
        self.server.emit(event, data, to=to, skip_sid=skip_sid, namespace=namespace,
                         callback=callback, **kwargs)

    def send(self, data, json=False, namespace=None, to=None, callback=None,
             include_self=True, skip_sid=None, **kwargs):
        skip_sid = flask.request.sid if not include_self else skip_sid
        self.emit("json" if json else "message", data, namespace=namespace, to=to,
                  skip_sid=skip_sid, callback=callback, **kwargs)

    def call(self, event: str, *args, **kwargs):
        """Emit to one client and wait for its answer (``timeout``, 60 s by default)."""
        to = kwargs.pop("to", None) or kwargs.pop("room", None)
        data = args[0] if len(args) == 1 else tuple(args) if args else None
        return self.server.call(event, data, to=to, namespace=kwargs.pop("namespace", "/"),
                                timeout=kwargs.pop("timeout", 60))

    def close_room(self, room: str, namespace: Optional[str] = None) -> None:
        self.server.close_room(room, namespace)

    # ---- tasks and running ------------------------------------------------------------------

    def start_background_task(self, target: Callable, *args, **kwargs):
        """A greenlet in this process (once per app-node), or once per cluster with
        ``background_tasks="cluster"``: see `App.start_background_task`."""
        return self.server.start_background_task(target, *args, **kwargs)

    def start_cluster_task(self, target: Callable, *args, **kwargs):
        """Run ``target`` once per cluster: see `App.start_cluster_task`."""
        return self.server.start_cluster_task(target, *args, **kwargs)

    def sleep(self, seconds: float = 0) -> None:
        self.server.sleep(seconds)

    def run(self, app=None, host=None, port=None, **kwargs):
        module = getattr(app, "import_name", None) or "module"
        raise RuntimeError(RUN.format(module=module))

    def stop(self):
        raise RuntimeError("siocluster's nodes stop on SIGTERM (each finishes what it holds); "
                           "stop them, not the SocketIO object")

    def test_client(self, *args, **kwargs):
        raise RuntimeError("test the original app with Flask-SocketIO's test client, or the "
                           "ported one with real clients on a cluster (tests/conftest.py's "
                           "`cluster` fixture shows how)")


class NoSocketIO:
    """Wraps a Flask app's WSGI app: ``/socket.io/`` is not served by it on siocluster
    (io-nodes serve it; `siocluster.pages` puts them in front of it), so a request there
    says so instead of a bare 404."""

    def __init__(self, wsgi_app):
        self.wsgi_app = wsgi_app

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO", "").startswith("/socket.io"):
            logger.error(NO_SOCKET_IO)
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            return [NO_SOCKET_IO.encode()]
        return self.wsgi_app(environ, start_response)


class Namespace(socketio.Namespace):
    """Flask-SocketIO's class-based namespace: ``on_<event>`` methods without sid."""

    def __init__(self, namespace=None):
        super().__init__(namespace)
        self.socketio = None

    def trigger_event(self, event, *args):
        handler = getattr(self, "on_" + (event or ""), None)
        if handler is None:
            return None
        try:
            return self.socketio.handle_event(handler, event, self.namespace, *args)
        except TypeError:
            if event == "disconnect":     # the older on_disconnect(self), without a reason
                return self.socketio.handle_event(handler, event, self.namespace, *args[:-1])
            raise

    def emit(self, event, data=None, room=None, include_self=True, namespace=None,
             callback=None):
        return self.socketio.emit(event, data, room=room, include_self=include_self,
                                  namespace=namespace or self.namespace, callback=callback)

    def send(self, data, room=None, include_self=True, namespace=None, callback=None):
        return self.socketio.send(data, room=room, include_self=include_self,
                                  namespace=namespace or self.namespace, callback=callback)

    def close_room(self, room, namespace=None):
        return self.socketio.close_room(room=room, namespace=namespace or self.namespace)


# ---- the functions handlers call: about the client of the running handler ------------------

def _socketio() -> SocketIO:
    return flask.current_app.extensions["socketio"]


def _recipient(kwargs: dict):
    """Flask-SocketIO's default: the sender, unless ``to``/``room`` or ``broadcast``."""
    to = kwargs.pop("to", None) or kwargs.pop("room", None)
    if to is None and not kwargs.pop("broadcast", False):
        to = flask.request.sid
    return to


def emit(event: str, *args, **kwargs):
    """Emit from a handler: to its client, unless ``to=`` (a sid or room) or
    ``broadcast=True``; ``include_self=False`` leaves the client out."""
    namespace = kwargs.pop("namespace") if "namespace" in kwargs else flask.request.namespace
    to = _recipient(kwargs)
    return _socketio().emit(event, *args, namespace=namespace, to=to, **kwargs)


def send(message, **kwargs):
    namespace = kwargs.pop("namespace") if "namespace" in kwargs else flask.request.namespace
    to = _recipient(kwargs)
    return _socketio().send(message, namespace=namespace, to=to, **kwargs)


def call(event: str, *args, **kwargs):
    namespace = kwargs.pop("namespace") if "namespace" in kwargs else flask.request.namespace
    to = kwargs.pop("to", None) or kwargs.pop("room", None) or flask.request.sid
    return _socketio().call(event, *args, namespace=namespace, to=to, **kwargs)


def join_room(room: str, sid: Optional[str] = None, namespace: Optional[str] = None) -> None:
    _socketio().server.enter_room(sid or flask.request.sid, room,
                                  namespace=namespace or flask.request.namespace)


def leave_room(room: str, sid: Optional[str] = None, namespace: Optional[str] = None) -> None:
    _socketio().server.leave_room(sid or flask.request.sid, room,
                                  namespace=namespace or flask.request.namespace)


def close_room(room: str, namespace: Optional[str] = None) -> None:
    _socketio().server.close_room(room, namespace=namespace or flask.request.namespace)


def rooms(sid: Optional[str] = None, namespace: Optional[str] = None):
    """The client's rooms, its own sid first (then the others, sorted)."""
    return _socketio().server.rooms(sid or flask.request.sid,
                                    namespace=namespace or flask.request.namespace)


def disconnect(sid: Optional[str] = None, namespace: Optional[str] = None, silent=False):
    return _socketio().server.disconnect(sid or flask.request.sid,
                                         namespace=namespace or flask.request.namespace)
