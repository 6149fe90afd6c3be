"""The io-node: holds browser connections, pushes what clients do, applies what app-nodes say.

Its Socket.IO handlers do one thing: wrap a client's connect, event or disconnect in an
`Envelope` and put it in the `Outbox`, which a push loop sends to the inbox in batches. A
listen loop reads the command streams (`StreamReader`: the one for every io-node and this
node's own, in order) and applies each command to the clients held here with
python-socketio's own rooms and emit, one small method per command kind.

Run it with ``python -m siocluster.ionode --port 8081``, or as a WSGI app under
``gunicorn -k geventwebsocket.gunicorn.workers.GeventWebSocketWorker -w 1
siocluster.wsgi:application``.
"""

if __name__ == "__main__":  # an entry point: patch before anything imports socket or ssl
    from gevent import monkey

    monkey.patch_all()

import functools
import logging
import time
from typing import Callable, Dict, List, Optional

import gevent
import gevent.event
import socketio
from socketio.exceptions import ConnectionRefusedError as SioConnectionRefused

from . import defaults, engine, transport
from .applier import CommandApplier
from .engine import IoSocketServer
from .entry import catch_signals, listen_error
from .envelope import JSON, RESERVED_EVENTS, Envelope
from .ioclient import Client, ClientEvents, safe_environ, same_host_origins, shown
from .listener import IoHttpServer
from .node import REDIS_DOWN, Node, require_gevent_patch
from .outbox import INBOX_FULL, Outbox
from .rejoin import Rejoin
from .shards import Inboxes
from .streams import CommandStreams
from .telemetry import IoTelemetry
from .transport import IoPacket

CLOSING = "this io-node is shutting down: connect to another"
NO_VERDICT = "no answer from the app tier in time: try again shortly"
GONE = "the connection closed while it was being accepted"
REAPED = "io-node taken for dead"
RESERVED = "event name reserved for the connection's lifecycle: use another name"
MALFORMED = "malformed event: its name must be a string"
class IoNode(Rejoin, CommandApplier, ClientEvents, IoTelemetry, Node):
    """An io-node around a python-socketio server in gevent mode.

    :param config: a `Config` or a mapping of its keys.
    :param sio: a ``socketio.Server(async_mode='gevent')`` of your own (the seed's
        ``makeIoServer``), best an `IoSocketServer` (see `siocluster.engine`); by default an
        `IoSocketServer` is made with the config's CORS, size and backlog limits.
    :param redis: a redis-py client to use instead of one built from the config.

    The node is a WSGI application::

        node = IoNode({"REDIS_URL": "redis://localhost:6379/0"}).start()
        node.serve(("0.0.0.0", 8081))            # or hand `node` to any gevent WSGI server
    """

    role = "io-node"

    def __init__(self, config=None, sio: Optional[socketio.Server] = None, redis=None,
                 **server_options):
        super().__init__(config, redis)
        c = self.config
        if sio is None:
            options = {"async_mode": "gevent", "namespaces": "*",
                       # never '*' unless configured: a foreign page's handshake gets a 400
                       "cors_allowed_origins": c.cors_allowed_origins or same_host_origins,
                       # Engine.IO's hard cap cuts the connection; ours (`max_message_size`,
                       # on the envelope) stays below it so the client is told why instead
                       "max_http_buffer_size": 2 * c.max_message_size + 64 * 1024,
                       # our handlers never block on events, so spare a greenlet per event
                       "async_handlers": False,
                       "max_send_backlog": c.max_send_backlog,
                       "handshake_timeout": c.handshake_timeout,
                       "max_attachments": c.max_attachments, "json": JSON,
                       "serializer": IoPacket}
            options.update(server_options)
            sio = IoSocketServer(**options)
        self.sio = sio
        sio.on("connect", self._on_connect, namespace="*")
        sio.on("disconnect", self._on_disconnect, namespace="*")
        engine.hook_events(sio, self._on_event)     # events with their ack id
        self.wsgi_app = socketio.WSGIApp(sio)
        self.clients: Dict[str, Client] = {}
        self.inbox = Inboxes(self.redis, self.keys, c)
        self.outbox = Outbox(self.inbox, self.state, c.outbox_size, c.outbox_max_bytes,
                             c.max_message_size, self.recovery)
        self.streams = CommandStreams(self.redis, self.keys, c.stream_maxlen)
        self.readers = self.streams.readers(self.id, self.logger)
        self.init_rejoin(sio)
        self.init_telemetry()
        self._pending_acks: Dict[str, tuple] = {}     # envelope id -> (eio_sid, ns, ack id, t)
        self._pending_connects: Dict[str, gevent.event.AsyncResult] = {}
        self.hooks: Dict[str, List[Callable]] = {}
        self._closing = False
        self.address = None

    def __call__(self, environ, start_response):
        answer = self.observer.serve(environ, start_response)   # /metrics, /healthz, /readyz
        if answer is not None:
            return answer
        if self._closing and "sid=" not in environ.get("QUERY_STRING", ""):
            # a new connection while shutting down: an HTTP error, which clients retry
            # (elsewhere, or on our successor), where a refused Socket.IO connect is final
            start_response("503 Service Unavailable", [("Content-Type", "text/plain"),
                                                       ("Connection", "close")])
            return [CLOSING.encode()]
        return self.wsgi_app(environ, start_response)

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self):
        require_gevent_patch("io-node")
        transport.use_fast_websocket_reads()
        self.check_redis()
        for reader in self.readers:
            reader.start()
        self.applied = [reader.last_ids[reader.streams[0]] for reader in self.readers]
        super().start()
        self.spawn_loop(self._push_step, "push")
        for reader in self.readers:     # one per shard's stream
            self.spawn_loop(functools.partial(self._listen_step, reader),
                            f"listen-{reader.shard}")
        self.spawn_loop(self._sweep_step, "sweep")
        self.logger.info("io-node %s started", self.id)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Take no new connections, close every client's (they reconnect, to another
        io-node), push their disconnects to the inbox, and deregister."""
        deadline = time.monotonic() + timeout
        self._closing = True                   # connects from now on are refused
        # every client reconnects by itself, to another io-node
        sockets = transport.drop_connections(self.sio)
        # polling clients learn it with their next request: a moment for it
        drain = min(deadline, time.monotonic() + 2.0)
        while transport.sends_pending(sockets) and time.monotonic() < drain:
            gevent.sleep(0.05)
        if getattr(self, "_server", None) is not None:
            self._server.stop(timeout=0)       # closes the listener
        while len(self.outbox) and time.monotonic() < deadline:
            gevent.sleep(0.05)
        unsent = len(self.outbox)
        if unsent:
            # still registered: once our heartbeat lapses, the reaper tells the app tier
            # that our clients are gone
            self.stopping.set()
            self.join(max(0.1, deadline - time.monotonic()))
            self.logger.warning("io-node %s stopped with %d message(s) it could not push; "
                                "the reaper will disconnect its clients", self.id, unsent)
            return
        super().stop(max(0.1, deadline - time.monotonic()))
        try:
            self.streams.delete(self.id)
        except REDIS_DOWN:
            pass      # the reaper deletes it with our registry entry

    def serve(self, address=None, **server_options):
        """Listen with gevent's WSGI server and gevent-websocket; blocks until stopped."""
        self.start_server(address, **server_options)
        self.stopping.wait()

    def start_server(self, address=None, **server_options):
        """Start listening (websocket and polling; https and wss when ``CERTFILE`` is set)
        without blocking; returns the server, an `IoHttpServer` holding at most
        ``MAX_CONNECTIONS`` connections, ``MAX_CONNECTIONS_PER_ADDRESS`` from one address,
        each given ``HANDSHAKE_TIMEOUT`` to send a request. ``server_options`` go to it.
        A certificate that cannot be loaded raises a `ConfigError`."""
        c = self.config
        address = address or (c.http_host, c.http_port)
        options = {"max_connections": c.max_connections,
                   "max_connections_per_address": c.max_connections_per_address,
                   "handshake_timeout": c.handshake_timeout, "certfile": c.certfile,
                   "keyfile": c.keyfile}
        options.update(server_options)
        self._server = IoHttpServer(address, self, **options)
        # gevent-websocket upgrades before the application runs: without this hook a
        # websocket handshake from a foreign origin would be upgraded, then closed
        self._server.pre_start_hook = self._refuse_upgrade
        self._server.start()
        self.address = self._server.address
        self.heartbeat()
        return self._server

    def _refuse_upgrade(self, handler) -> bool:
        """gevent-websocket's pre-start hook: a websocket handshake from a foreign origin is
        not upgraded, so Engine.IO answers it with an HTTP 400 as it does a polling one."""
        return not engine.origin_allowed(self.sio, handler.environ)

    def info(self) -> dict:
        info = super().info()
        host, port = (self.address or (self.config.http_host, self.config.http_port))[:2]
        info.update(internal=host, port=port, external=self.config.public_host or host)
        info["tls"] = bool(self.config.certfile)      # clients must use https and wss
        if self.config.public_url:
            info["url"] = self.config.public_url      # behind a proxy: browsers use this
        info["clients"] = len(self.clients)
        info["polling_clients"] = sum(1 for sock in list(self.sio.eio.sockets.values())
                                      if not getattr(sock, "upgraded", True))
        return info

    # ---- client -> inbox --------------------------------------------------------------------

    def _on_connect(self, namespace, sid, environ, auth=None):
        if self._closing:
            self.count_refusal("connect", CLOSING)
            raise SioConnectionRefused(CLOSING)
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, namespace)
        client = Client(sid, namespace, eio_sid, self.client_info(sid, namespace, environ),
                        self.config.rate_burst)
        self.clients[sid] = client
        envelope = Envelope("connect", namespace, sid, self.id, self.get_client_info(client),
                            environ=safe_environ(environ), auth=auth)
        comeback, record = self.recovery_fields(client, envelope)
        verdict = gevent.event.AsyncResult()
        self._pending_connects[envelope.id] = verdict
        try:
            refusal = self.outbox.put(envelope, extra=record)
            if refusal is not None:
                self.clients.pop(sid, None)
                self.count_refusal("connect", refusal)
                raise SioConnectionRefused(refusal)
            try:
                ok, error = verdict.get(timeout=self.config.connect_timeout)
            except gevent.Timeout:
                ok, error = self.config.connect_timeout_accept, {"message": NO_VERDICT}
                self.logger.warning("io-node %s: no connect verdict for %s in %.1fs, %s it",
                                    self.id, sid, self.config.connect_timeout,
                                    "accepting" if ok else "refusing")
                if not ok:
                    # the app tier will see the connect later: pair it with a disconnect
                    self.send_to_app(Envelope("disconnect", namespace, sid, self.id,
                                              client.info, reason="connect timed out"))
        finally:
            self._pending_connects.pop(envelope.id, None)
        if self.clients.get(sid) is not client:
            # its transport closed while it waited: its disconnect went to the app tier
            ok, error = False, {"message": GONE}
        elif not self._transport_open(eio_sid):
            # closed without a Socket.IO disconnect (python-socketio sends none for a
            # client not connected yet): the app tier must hear that it left all the same
            self.send_to_app(Envelope("disconnect", namespace, sid, self.id, client.info,
                                      reason="transport closed while connecting"))
            ok, error = False, {"message": GONE}
        if not ok:
            self.clients.pop(sid, None)
            self.count_refusal("connect", error.get("message") if isinstance(error, dict)
                               else error)
            if comeback is not None:
                # it was claimed for this connection: its old self has left for good
                self.send_to_app(Envelope("disconnect", namespace, sid, self.id, client.info,
                                          reason="refused on its return", conn=eio_sid))
            if isinstance(error, dict):
                raise SioConnectionRefused(error.get("message"), *(
                    [error["data"]] if error.get("data") is not None else []))
            raise SioConnectionRefused(error or "connection refused")
        self.stats.connects += 1
        self.stats.recovered += comeback is not None
        self.fire("socket connection", client)
        return True

    def _transport_open(self, eio_sid: str) -> bool:
        sock = self.sio.eio.sockets.get(eio_sid)
        return sock is not None and not (sock.closed or sock.closing)

    def _on_event(self, server, sid, eio_sid, data, namespace, ack_id):
        client = self.clients.get(sid)
        if client is None:
            return
        event, args = (data[0], data[1:]) if data else (None, [])
        if not isinstance(event, str) or event in RESERVED_EVENTS:
            self._refuse(client, event, ack_id, RESERVED if event in RESERVED_EVENTS
                         else MALFORMED)
            return
        if not client.take_token(self.config.rate_limit, self.config.rate_burst):
            self._refuse(client, event, ack_id, "rate limit exceeded, slow down")
            return
        envelope = Envelope("event", namespace, sid, self.id, self.get_client_info(client),
                            event=event, args=args, ack=ack_id is not None)
        if ack_id is not None:
            self._pending_acks[envelope.id] = (eio_sid, namespace, ack_id,
                                               time.monotonic() + self.config.ack_timeout)
        refusal = self.outbox.put(envelope, ack_id)
        if refusal is not None:
            self._pending_acks.pop(envelope.id, None)
            self._refuse(client, event, ack_id, refusal)
            return
        self.stats.events += 1
        self.fire("socket message", client, event, args)

    def _on_disconnect(self, namespace, sid, reason=None):
        client = self.clients.pop(sid, None)
        if client is None:
            return
        if self.quiet(client.eio_sid):
            return      # it came back on another connection: nothing to tell
        envelope = Envelope("disconnect", namespace, sid, self.id, self.get_client_info(client),
                            reason=str(reason) if reason is not None else None)
        if self.parked(client, envelope, reason, self._closing):
            self.stats.parked += 1
            self.fire("socket disconnect", client)
            return
        self.stats.disconnects += 1
        refusal = self.outbox.put(envelope)
        if refusal is not None:
            self.logger.error("io-node %s: the disconnect of %s cannot be encoded (%s); the "
                              "reaper will tell the app tier when this node stops",
                              self.id, sid, refusal)
        self.fire("socket disconnect", client)

    def _refuse(self, client: Client, event, ack_id, reason: str) -> None:
        """Tell a client its message was not taken: by its ack, and by an ``error`` event
        that names the event (cut short: it is the client's input)."""
        event = shown(event)
        self.count_refusal("event", reason)
        self.logger.warning("io-node %s: refused %r from %s: %s", self.id, event, client.sid,
                            reason, extra={"sid": client.sid, "event": event})
        if ack_id is not None:
            engine.send_ack(self.sio, client.eio_sid, client.namespace, ack_id,
                           [{"ok": False, "error": reason}])
        self.sio.emit("error", {"event": event, "error": reason}, to=client.sid,
                      namespace=client.namespace)

    def send_to_app(self, envelope: Envelope) -> bool:
        """Queue a message for the app tier as one of this io-node's clients'; False when it
        was refused (too large, or the outbox is full: Redis unreachable for a while)."""
        return self.outbox.put(envelope) is None

    def _push_step(self):
        refused = self.outbox.push(self.config.pop_timeout)
        self._redis_back()
        for item in refused:
            self._refused_by_inbox(item)

    def _refused_by_inbox(self, item) -> None:
        if item.kind == "connect":
            verdict = self._pending_connects.get(item.id)
            if verdict is not None:
                verdict.set((False, {"message": INBOX_FULL}))
            try:
                self.state.forget_client(item.sid, item.namespace, self.id)
            except REDIS_DOWN:
                self.logger.warning("io-node %s: could not remove refused client %s",
                                    self.id, item.sid)
            return
        self._pending_acks.pop(item.id, None)
        client = self.clients.get(item.sid)
        if client is not None:
            self._refuse(client, item.event, item.ack_id, INBOX_FULL)

    # ---- commands -> clients ----------------------------------------------------------------

    def redis_returned(self) -> None:
        for reader in self.readers:
            reader.check_due = True       # commands may have been trimmed meanwhile

    def reaped(self) -> None:
        """The cluster took this io-node for dead and told the app tier its clients left:
        close their connections so they reconnect and connect anew. Clients the reaper did
        not know of (they connected while this node was cut off) get their disconnect from
        here; each client's disconnect is pushed once, whoever pushes it."""
        super().reaped()
        clients, self.clients = self.clients, {}
        envelopes = [Envelope("disconnect", client.namespace, client.sid, self.id,
                              self.get_client_info(client), reason=REAPED)
                     for client in clients.values()]
        pipe = self.redis.pipeline(transaction=False)
        for envelope in envelopes:
            self.inbox.push_disconnect(self.id, envelope.sid, envelope.encode(), pipe)
        try:
            pipe.execute()
        except REDIS_DOWN:
            # Redis went away again: through the outbox, pushed once it is back; a client
            # the reaper handled may then be told twice (at least once, as everywhere)
            self.logger.warning("io-node %s: Redis went away while it told the app tier of "
                                "%d client(s); they wait in the outbox", self.id,
                                len(envelopes))
            for envelope in envelopes:
                self.send_to_app(envelope)
        for eio_sid in {client.eio_sid for client in clients.values()}:
            try:
                self.sio.eio.disconnect(eio_sid)
            except Exception:
                self.logger.exception("io-node %s: closing %s", self.id, eio_sid)

    def _listen_step(self, reader):
        commands = reader.read(defaults.COMMAND_BATCH, self.config.pop_timeout)
        self._redis_back()
        with transport.corked():        # each client's frames of the batch in one send
            self.apply_in_order(commands, reader)

    def _sweep_step(self):
        """Forget acks nobody answered in time, so memory stays bounded."""
        self.stopping.wait(min(5.0, self.config.ack_timeout))
        now = time.monotonic()
        self.sweep_quiet()
        expired = [k for k, v in self._pending_acks.items() if v[3] < now]
        for key in expired:
            eio_sid, namespace, ack_id, _ = self._pending_acks.pop(key)
            engine.send_ack(self.sio, eio_sid, namespace, ack_id,
                           [{"ok": False, "error": "no answer from the app in time"}])


def main(argv=None) -> None:
    import argparse

    from redis.exceptions import RedisError

    from . import logs
    from .config import Config, ConfigError
    from .connection import start_failure

    parser = argparse.ArgumentParser(prog="python -m siocluster.ionode",
                                     description="Run an io-node: Socket.IO connections <-> Redis.")
    config, _ = Config.load(argv, parser=parser, role="io-node")
    logs.setup(config, "io-node")
    try:
        node = IoNode(config)
        logs.identify(node.id)
        node.check_redis()
    except (RuntimeError, RedisError) as exc:   # Redis unreachable or refusing: says what to do
        raise SystemExit(f"io-node: {start_failure(exc, config.effective_redis_url)}")
    # listening before registering: the frontend-node lists registered io-nodes to browsers
    try:
        node.start_server()
    except ConfigError as exc:       # a certificate that cannot be loaded: names the files
        raise SystemExit(f"io-node: {exc}")
    except OSError as exc:
        raise SystemExit(listen_error("io-node", exc, config.http_host, config.http_port))
    shutdown = catch_signals()      # from here on a signal stops the node gracefully
    node.start()
    logging.getLogger("siocluster").info("io-node %s listening on %s:%s", node.id,
                                         *node.address[:2])
    node.run_until_signalled("stopping", shutdown)


if __name__ == "__main__":
    # the canonical module's main, not this __main__ copy: its classes would be strangers
    # to the ones the application imports from siocluster
    from siocluster.ionode import main as _main

    _main()
