"""The seed's API (Socket.IO-cluster for Node.js), in Python names.

The shortcuts, as in the seed's README::

    node = siocluster.seed.make_io_listener(None, config)  # an io-node, running
    node.serve()                                          # listen on HTTP_HOST:HTTP_PORT

    io = siocluster.seed.make_listener(config)            # the app-node adapter: an App
    @io.on("connection")
    def connection(sid, environ):
        ...
    io.run()                                              # until SIGINT/SIGTERM

``make_io_server(sio, config)`` makes an io-node without starting it, ``make_app_server(config,
app)`` an app-node without starting it, and ``make_frontend_server(flask_app, config)`` (in
`siocluster.frontend`) registers the frontend-node on a Flask site.

Messages, as in the seed. On an io-node, io-node code sends a client's message to the app
tier; the app-node's handler for the message's type (``message`` by default) gets it::

    node.create_message(client, {"hello": 1}).set_type("greet").send()

On an app-node, a handler sends a message to clients, channels (rooms) or everyone; a plain
message (type ``publish``) emits a ``message`` event with the data, a custom type reaches
io-node code as the io-node event ``app <type>``::

    io.create_message("hi").for_channel("lobby").except_client(sid).send()
    io.create_message(42).set_type("setUserId").for_client(sid).send()

    @node.on("app setUserId")                              # on the io-node
    def set_user_id(message):
        for client in node.clients_of(message):            # those held by this io-node
            client.data["user_id"] = message["data"]

The io-node events are ``socket connection`` (client), ``socket message`` (client, event,
args), ``socket disconnect`` (client), ``app publish``, ``app subscribe-to-channel``,
``app unsubscribe-from-channel`` (the command) and ``app <type>`` (the message: ``type``,
``data``, ``ns``, ``recipients`` and ``except``). The seed's camelCase names are aliases of the
snake_case ones: ``createMessage``, ``setData``, ``forChannel``, ``makeListener``, ...
"""

from typing import Any, List, Optional

import socketio

from .app import App
from .appnode import AppNode
from .envelope import Envelope, app_command, data_to_args, dumps
from .ioclient import Client
from .ionode import IoNode

# the seed's app-node event names that python-socketio spells differently
SEED_EVENTS = {"connection": "connect"}

# app-node message types the seed's io-node itself acts on; any other type is custom
PUBLISH = "publish"
SUBSCRIBE = "subscribe-to-channel"
UNSUBSCRIBE = "unsubscribe-from-channel"

RECIPIENT_TYPES = ("client", "channel", "all")


# ---- io-node side -----------------------------------------------------------------------------

class IoMessage:
    """A message io-node code sends to the app tier as one of its clients' messages.

    Made by `IoListener.create_message`; its type (``message`` unless `set_type` says
    otherwise) is the event the app-node's handler is registered for, and the data its
    arguments (a tuple as several)::

        node.create_message(client, "hi").send()              # app: @app.on("message")
        node.create_message(client).set_type("ready").send()  # app: @app.on("ready")
    """

    def __init__(self, node: IoNode, client=None, data: Any = None, type: str = "message"):
        self.node = node
        self.client: Optional[Client] = None
        self.data = data
        self.type = type
        if client is not None:
            self.set_client(client)

    def set_client(self, client) -> "IoMessage":
        """The client the message is from: a `Client` of this io-node, its sid, or a mapping
        with its ``sid`` (the seed's ``sessionId`` works too)."""
        if isinstance(client, Client):
            self.client = client
            return self
        sid = client
        if isinstance(client, dict):
            sid = client.get("sid") or client.get("sessionId")
        found = self.node.clients.get(sid) if isinstance(sid, str) else None
        if found is None:
            raise LookupError(f"io-node {self.node.id} holds no client {sid!r}: a message can "
                              "only be sent for a client connected to this io-node")
        self.client = found
        return self

    def set_data(self, data: Any) -> "IoMessage":
        self.data = data
        return self

    def set_type(self, type: str) -> "IoMessage":
        self.type = type
        return self

    def send(self) -> bool:
        """Queue the message for the inbox; False when the io-node's outbox is full (Redis
        has been unreachable for a while): try again later."""
        client = self.client
        if client is None:
            raise ValueError("the message has no client: call set_client(client) first")
        envelope = Envelope("event", client.namespace, client.sid, self.node.id,
                            self.node.get_client_info(client), event=self.type,
                            args=data_to_args(self.data))
        return self.node.send_to_app(envelope)

    setClient = set_client
    setData = set_data
    setType = set_type


class IoListener(IoNode):
    """An io-node with the seed's names (what `make_io_listener` and `make_io_server` make).

    :param config: a `Config` or a mapping of its keys.
    :param sio: a ``socketio.Server(async_mode='gevent')`` of your own.
    :param wsgi_app: a WSGI app (a Flask site, say) served beside Socket.IO, so a single
        io-node can also be the frontend, as the seed's io-node with an http server.

    Override `get_client_info` (in a subclass, or by assigning a function of the client to
    the instance) to send your own client info with every message of a client; register
    io-node events with `on`.
    """

    def __init__(self, config=None, sio: Optional[socketio.Server] = None, wsgi_app=None,
                 redis=None, **server_options):
        super().__init__(config, sio=sio, redis=redis, **server_options)
        if wsgi_app is not None:
            self.wsgi_app = socketio.WSGIApp(self.sio, wsgi_app)

    @property
    def server(self) -> "IoListener":
        """The seed's ``ioNode.server`` (where io-node events were registered): the node."""
        return self

    @property
    def socket_io(self) -> socketio.Server:
        """The python-socketio server (the seed's ``ioNode.socketIo``)."""
        return self.sio

    def create_message(self, client=None, data: Any = None) -> IoMessage:
        """A message to the app tier as ``client``'s (a `Client` or its sid)."""
        return IoMessage(self, client, data)

    def clients_of(self, message: dict) -> List[Client]:
        """The clients held here that an ``app <type>`` message is for: its client
        recipients, the members of its channels, or everyone in its namespace for ``all``,
        less its ``except``."""
        ns = message.get("ns", "/")
        sids: List[str] = []
        for recipient in message.get("recipients", ()):
            if recipient["type"] == "client":
                sids.append(recipient["id"])
            elif recipient["type"] == "channel":
                sids.extend(sid for sid, _ in
                            self.sio.manager.get_participants(ns, recipient["id"]))
            elif recipient["type"] == "all":
                sids.extend(c.sid for c in self.clients.values() if c.namespace == ns)
        skip = set(message.get("except", ()))
        found: List[Client] = []
        for sid in dict.fromkeys(sids):
            client = self.clients.get(sid)
            if client is not None and client.namespace == ns and sid not in skip:
                found.append(client)
        return found

    createMessage = create_message
    socketIo = socket_io


def make_io_server(sio: Optional[socketio.Server] = None, config=None) -> IoListener:
    """An io-node around ``sio`` (or a server of its own), not started: call ``start()``,
    then ``serve()`` or hand it to a gevent WSGI server."""
    if sio is not None and not isinstance(sio, socketio.Server):
        raise TypeError(f"make_io_server() takes a socketio.Server (or None), not "
                        f"{type(sio).__name__}")
    return IoListener(config, sio=sio)


def make_io_listener(server_or_wsgi_app=None, config=None) -> IoListener:
    """An io-node with its handlers attached, started (its Redis loops run).

    :param server_or_wsgi_app: None, a ``socketio.Server(async_mode='gevent')`` to use, or
        a WSGI app to serve beside Socket.IO (paths other than ``/socket.io/``).

    It is a WSGI app: ``node.serve()`` listens on the config's ``HTTP_HOST:HTTP_PORT`` (or
    ``node.serve(("0.0.0.0", 8081))``); under gunicorn, hand it over as the application.
    Call it after gevent's ``monkey.patch_all()``.
    """
    if server_or_wsgi_app is None or isinstance(server_or_wsgi_app, socketio.Server):
        node = IoListener(config, sio=server_or_wsgi_app)
    elif callable(server_or_wsgi_app):
        node = IoListener(config, wsgi_app=server_or_wsgi_app)
    else:
        raise TypeError("make_io_listener() takes a socketio.Server, a WSGI app to serve "
                        "beside Socket.IO, or None; the seed's http.Server is the io-node "
                        f"itself here (node.serve()), not {type(server_or_wsgi_app).__name__}")
    return node.start()


# ---- app-node side ----------------------------------------------------------------------------

class AppMessage:
    """A message an app-node sends to clients, channels or everyone (the seed's
    ``appNode.Message``); made by `Listener.create_message` or ``AppMessage(app, data)``.

    - type ``publish`` (the default): emits the data as a ``message`` event (or the event
      given to `set_event`) to the recipients;
    - ``subscribe-to-channel`` / ``unsubscribe-from-channel``: the client recipients enter
      or leave the channel named by the data;
    - any other type: io-node code gets it as the io-node event ``app <type>``, a dict with
      ``type``, ``data`` (JSON), ``ns``, ``recipients`` (``[{"type", "id"}]``) and
      ``except`` (sids); it goes to every io-node, and each acts on its own clients.

    Inside a handler it is sent with the handler's other commands, in order.
    """

    def __init__(self, app: App, data: Any = None, type: str = PUBLISH,
                 namespace: Optional[str] = None):
        self.app = app
        self.data = data
        self.type = type
        self.namespace = namespace or "/"
        self.event = "message"
        self.recipients: List[dict] = []
        self.excluded: List[str] = []

    def set_data(self, data: Any) -> "AppMessage":
        self.data = data
        return self

    def set_type(self, type: str) -> "AppMessage":
        self.type = type
        return self

    def set_event(self, event: str) -> "AppMessage":
        """The Socket.IO event a ``publish`` message is emitted as (``message``)."""
        self.event = event
        return self

    def set_namespace(self, namespace: str) -> "AppMessage":
        self.namespace = namespace
        return self

    def add_recipient(self, type: str, id: Optional[str] = None) -> "AppMessage":
        """Add a recipient: ``("client", sid)``, ``("channel", room)`` or ``("all",)``."""
        if type not in RECIPIENT_TYPES:
            raise ValueError(f"recipient type {type!r} is not one of {', '.join(RECIPIENT_TYPES)}")
        if type != "all" and not isinstance(id, str):
            raise ValueError(f"a {type} recipient needs its id (a string), not {id!r}")
        recipient = {"type": type, "id": id}
        if recipient not in self.recipients:
            self.recipients.append(recipient)
        return self

    def for_client(self, sid: str) -> "AppMessage":
        return self.add_recipient("client", sid)

    def for_channel(self, channel: str) -> "AppMessage":
        return self.add_recipient("channel", channel)

    def for_all(self) -> "AppMessage":
        return self.add_recipient("all")

    def except_client(self, sid: str) -> "AppMessage":
        """Leave a client out: it is dropped from the recipients and skipped by the channels
        and the ``all`` it would be reached through."""
        self.recipients = [r for r in self.recipients
                           if not (r["type"] == "client" and r["id"] == sid)]
        if sid not in self.excluded:
            self.excluded.append(sid)
        return self

    def send(self) -> None:
        if not self.recipients:
            if self.excluded:
                return      # every recipient was excepted: nothing to send
            raise ValueError("the message has no recipients: add some with for_client(sid), "
                             "for_channel(channel) or for_all()")
        if self.type == PUBLISH:
            self._publish()
        elif self.type in (SUBSCRIBE, UNSUBSCRIBE):
            self._subscribe()
        else:
            self._custom()

    def _publish(self) -> None:
        if any(r["type"] == "all" for r in self.recipients):
            to = None
        else:
            ids = [r["id"] for r in self.recipients]
            to = ids[0] if len(ids) == 1 else ids
        self.app.emit(self.event, self.data, to=to, skip_sid=self.excluded or None,
                      namespace=self.namespace)

    def _subscribe(self) -> None:
        if not isinstance(self.data, str):
            raise ValueError(f"a {self.type} message's data is the channel name, "
                             f"not {self.data!r}")
        others = [r for r in self.recipients if r["type"] != "client"]
        if others:
            raise ValueError(f"a {self.type} message is for clients only: use for_client(sid)")
        for recipient in self.recipients:
            if self.type == SUBSCRIBE:
                self.app.enter_room(recipient["id"], self.data, namespace=self.namespace)
            else:
                self.app.leave_room(recipient["id"], self.data, namespace=self.namespace)

    def _custom(self) -> None:
        try:
            dumps(self.data)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"the data of a custom {self.type!r} message goes to io-node code "
                            f"as JSON, and this is not JSON ({exc}): send bytes base64-encoded")
        self.app.send_command(app_command(self.type, self.data, self.namespace,
                                          self.recipients, self.excluded))

    setData = set_data
    setType = set_type
    addRecipient = add_recipient
    forClient = for_client
    forChannel = for_channel
    forAll = for_all
    exceptClient = except_client


class Listener(App):
    """The seed's app-node adapter: an `App` bound to an `AppNode` of its own.

    The seed's events map onto python-socketio's: ``connection`` is ``connect(sid, environ,
    auth)``; ``message(sid, data)``, ``disconnect(sid, reason)`` and ``no-client(sid,
    client_info)`` keep their names. `run` runs the app-node until SIGINT or SIGTERM;
    `start` and `stop` run it in the background. ``python -m siocluster.appnode
    module:listener`` runs it too.

    :param config: a `Config` or a mapping of its keys.
    :param redis: a redis-py client to use instead of one built from the config.
    """

    def __init__(self, config=None, redis=None):
        super().__init__()
        AppNode(self, config, redis)       # binds itself as self.node

    def on(self, event: str, handler=None, namespace: Optional[str] = None):
        return super().on(SEED_EVENTS.get(event, event), handler, namespace)

    def create_message(self, data: Any = None, namespace: Optional[str] = None) -> AppMessage:
        """A message to clients, channels or everyone (add recipients, then ``send()``)."""
        return AppMessage(self, data, namespace=namespace)

    def start(self) -> "Listener":
        """Start the app-node's workers in the background (gevent must have patched)."""
        self.node.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the messages in flight and stop."""
        self.node.stop(timeout)

    def run(self) -> None:
        """Run the app-node until SIGINT or SIGTERM, then drain and stop."""
        from .entry import catch_signals

        shutdown = catch_signals()      # from here on a signal stops the node gracefully
        self.start()
        self.node.run_until_signalled("draining", shutdown)

    createMessage = create_message


def make_app_server(config=None, app: Optional[App] = None) -> AppNode:
    """An app-node for ``app`` (by default a new `Listener`), not started: ``start()`` it."""
    if app is None:
        return Listener(config).node
    return AppNode(app, config)


def make_listener(config=None) -> Listener:
    """The app-node adapter with python-socketio's interface: register handlers on it,
    then ``run()`` it (or ``start()`` / ``stop()``)."""
    return Listener(config)


makeIoServer = make_io_server
makeIoListener = make_io_listener
makeAppServer = make_app_server
makeListener = make_listener
