"""The io-node: holds browser connections, pushes what clients do, applies what app-nodes say.

Its Socket.IO handlers do one thing: wrap a client's connect, event or disconnect in an
`Envelope` and queue it for the inbox. A pusher greenlet sends the queue to Redis in
batches (one round trip for many messages, and a bounded buffer while Redis is away). A
listener greenlet reads the command streams, the one for every io-node and this node's
own, and applies each command to the clients held here with python-socketio's own
rooms and emit.

Run it with ``python -m siocluster.ionode --port 8081``, or as a WSGI app under
``gunicorn -k geventwebsocket.gunicorn.workers.GeventWebSocketWorker -w 1
siocluster.wsgi:application``.
"""

if __name__ == "__main__":  # an entry point: patch before anything imports socket or ssl
    from gevent import monkey

    monkey.patch_all()

import logging
import time
from typing import Any, Callable, Dict, List, Optional

import gevent
import gevent.event
import gevent.queue
import socketio
from redis.exceptions import NoScriptError, ResponseError
from socketio import packet as sio_packet
from socketio.exceptions import ConnectionRefusedError as SioConnectionRefused

from . import defaults
from .engine import IoSocketServer
from .entry import listen_error
from .envelope import (
    Envelope,
    MessageError,
    args_to_data,
    decode_batch,
    dumps,
    pack_args,
    unpack_args,
)
from .node import REDIS_DOWN, Node, require_gevent_patch

# The part of a WSGI environ that travels to app-nodes with a connect: JSON-safe strings only.
ENVIRON_KEYS = ("REMOTE_ADDR", "REMOTE_PORT", "QUERY_STRING", "PATH_INFO", "SERVER_NAME",
                "SERVER_PORT", "SERVER_PROTOCOL", "REQUEST_METHOD")


def safe_environ(environ: dict) -> dict:
    return {k: v for k, v in environ.items()
            if isinstance(v, str) and (k.startswith("HTTP_") or k in ENVIRON_KEYS)}


def use_fast_websocket_reads() -> None:
    """Unmask clients' websocket frames with wsaccel's C code (a dependency): gevent-websocket
    picks up wsaccel's UTF-8 validator by itself, but unmasks in a Python loop over every
    byte (about 26 us for a short message). `IoNode.start` calls it; calling it again is
    harmless, and without wsaccel it changes nothing."""
    try:
        from wsaccel.xormask import XorMaskerSimple
    except ImportError:
        return
    from geventwebsocket.websocket import Header

    if getattr(Header.unmask_payload, "uses_wsaccel", False):
        return

    def unmask_payload(header, payload):
        # a bytearray, as gevent-websocket's own returns
        return bytearray(XorMaskerSimple(header.mask).process(payload))

    unmask_payload.uses_wsaccel = True
    Header.unmask_payload = unmask_payload


def _stream_id(entry_id: str):
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


# What a refused client message is told: errors say what to do.
OUTBOX_FULL = "server busy: the cluster cannot take messages right now, try again shortly"
INBOX_FULL = "server busy: too many messages are waiting, try again shortly"
NOT_TEXT = "message refused: it is not valid UTF-8 text"
CLOSING = "this io-node is shutting down: connect to another"

# Push a batch of envelopes to the inbox in order, refusing connects and events that would
# take it over its maximum length; a disconnect is never refused (its client is gone either
# way, and the app tier must hear of it). KEYS: inbox; ARGV: maxlen, then kind and envelope
# for each. Returns the 0-based positions of the refused ones.
_PUSH = """
local room = tonumber(ARGV[1]) - redis.call('LLEN', KEYS[1])
local refused = {}
for i = 2, #ARGV, 2 do
  if ARGV[i] == 'disconnect' or room > 0 then
    redis.call('LPUSH', KEYS[1], ARGV[i + 1])
    room = room - 1
  else
    refused[#refused + 1] = (i - 2) / 2
  end
end
return refused
"""


def same_host_origins(origin: str, environ: dict) -> bool:
    """The default CORS check: an ``Origin`` on the io-node's own host, any port (the
    frontend-node on the same host, as `make run-cluster` and a reverse proxy set it up)."""
    from urllib.parse import urlsplit

    try:
        host = urlsplit(origin).hostname
    except ValueError:
        return False
    hosts = {environ.get("HTTP_HOST", ""), environ.get("HTTP_X_FORWARDED_HOST", "")}
    hosts = {urlsplit("//" + h.split(",")[0].strip()).hostname for h in hosts if h}
    return host is not None and host in hosts


class Outgoing:
    """An envelope queued for the inbox, with what is needed to refuse it later."""

    __slots__ = ("raw", "record", "kind", "id", "sid", "namespace", "event", "ack_id")

    def __init__(self, raw, record, envelope: Envelope, ack_id=None):
        self.raw, self.record, self.ack_id = raw, record, ack_id
        self.kind, self.id, self.sid = envelope.kind, envelope.id, envelope.sid
        self.namespace, self.event = envelope.namespace, envelope.event


class Client:
    """A connection held by this io-node (the seed's ``client``).

    ``data`` is free for io-node code, e.g. a user id set on an ``app setUserId`` message;
    ``info`` is what `IoNode.get_client_info` computed at connect.
    """

    __slots__ = ("sid", "namespace", "eio_sid", "info", "data", "tokens", "stamp")

    def __init__(self, sid, namespace, eio_sid, info, burst):
        self.sid, self.namespace, self.eio_sid = sid, namespace, eio_sid
        self.info = info
        self.data = {}
        self.tokens = float(burst)     # rate limit: a token bucket
        self.stamp = time.monotonic()


class IoNode(Node):
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
                       "max_send_backlog": c.max_send_backlog}
            options.update(server_options)
            sio = IoSocketServer(**options)
        self.sio = sio
        sio.on("connect", self._on_connect, namespace="*")
        sio.on("disconnect", self._on_disconnect, namespace="*")
        # python-socketio answers a client's ack with the handler's return value at once;
        # here the answer comes later from an app-node, so events are taken over with their
        # ack id (the one hook python-socketio has for it).
        sio._handle_event_internal = self._on_event
        self.wsgi_app = socketio.WSGIApp(sio)
        self.clients: Dict[str, Client] = {}
        # bounded by `outbox_size` for connects and events; disconnects always get in
        self.outbox = gevent.queue.Queue()
        self._unsent: List[Outgoing] = []
        self._push = self.redis.register_script(_PUSH)
        self._pending_acks: Dict[str, tuple] = {}     # envelope id -> (eio_sid, ns, ack id, t)
        self._pending_connects: Dict[str, gevent.event.AsyncResult] = {}
        self.last_ids: Dict[str, str] = {}
        # entries ever added to each stream up to its last id (None on Redis < 7), to tell
        # when entries not read yet were trimmed away
        self._stream_seq: Dict[str, Optional[int]] = {}
        self._check_streams_due = False
        self.hooks: Dict[str, List[Callable]] = {}
        self._closing = False
        self.address = None

    def __call__(self, environ, start_response):
        return self.wsgi_app(environ, start_response)

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self):
        require_gevent_patch("io-node")
        use_fast_websocket_reads()
        self.check_redis()
        for stream in (self.keys.commands, self.keys.node_commands(self.id)):
            self.last_ids[stream], self._stream_seq[stream] = self._stream_tip(stream)
        super().start()
        self.spawn_loop(self._push_step, "push")
        self.spawn_loop(self._listen_step, "listen")
        self.spawn_loop(self._sweep_step, "sweep")
        self.logger.info("io-node %s started", self.id)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Take no new connections, close every client's (they reconnect, to another
        io-node), push their disconnects to the inbox, and deregister."""
        deadline = time.monotonic() + timeout
        self._closing = True                   # connects from now on are refused
        # dropping the Engine.IO connections, without a Socket.IO disconnect or even an
        # Engine.IO close packet (after which python-socketio's client gives up), makes
        # every client reconnect by itself, to another io-node
        sockets = list(self.sio.eio.sockets.values())
        for socket in sockets:
            try:
                # no waiting: a polling client may never come back for its last answer
                socket.close(wait=False, abort=True,
                             reason=self.sio.eio.reason.SERVER_DISCONNECT)
            except Exception:
                self.logger.exception("io-node %s: closing %s", self.id, socket.sid)
        # polling clients learn it with their next request: a moment for it
        drain = min(deadline, time.monotonic() + 2.0)
        while any(not s.queue.empty() for s in sockets) and time.monotonic() < drain:
            gevent.sleep(0.05)
        if getattr(self, "_server", None) is not None:
            self._server.stop(timeout=0)       # closes the listener
        while (self._unsent or not self.outbox.empty()) and time.monotonic() < deadline:
            gevent.sleep(0.05)
        unsent = len(self._unsent) + self.outbox.qsize()
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
            self.redis.delete(self.keys.node_commands(self.id))
        except Exception:
            pass

    def serve(self, address=None, **server_options):
        """Listen with gevent's WSGI server and gevent-websocket; blocks until stopped."""
        self.start_server(address, **server_options)
        self.stopping.wait()

    def start_server(self, address=None, **server_options):
        """Start listening (websocket and polling) without blocking; returns the server."""
        from gevent import pywsgi
        from geventwebsocket.handler import WebSocketHandler

        address = address or (self.config.http_host, self.config.http_port)
        options = {"handler_class": WebSocketHandler, "log": None}
        options.update(server_options)
        self._server = pywsgi.WSGIServer(address, self, **options)
        # gevent-websocket upgrades before the application runs: without this hook a
        # websocket handshake from a foreign origin would be upgraded, then closed
        self._server.pre_start_hook = self._refuse_upgrade
        self._server.start()
        self.address = self._server.address
        self.heartbeat()
        return self._server

    def origin_allowed(self, environ: dict) -> bool:
        """Whether a request's ``Origin`` may open a Socket.IO connection here, by the very
        rule Engine.IO applies (``cors_allowed_origins``)."""
        origin = environ.get("HTTP_ORIGIN")
        eio = self.sio.eio
        if not origin or eio.cors_allowed_origins == []:
            return True
        allowed = eio._cors_allowed_origins(environ)
        return allowed is None or origin in allowed

    def _refuse_upgrade(self, handler) -> bool:
        """gevent-websocket's pre-start hook: a websocket handshake from a foreign origin is
        not upgraded, so Engine.IO answers it with an HTTP 400 as it does a polling one."""
        return not self.origin_allowed(handler.environ)

    def info(self) -> dict:
        info = super().info()
        host, port = (self.address or (self.config.http_host, self.config.http_port))[:2]
        info.update(internal=host, port=port, external=self.config.public_host or host)
        info["clients"] = len(self.clients)
        return info

    # ---- io-node hooks (the seed's io-node events) ------------------------------------------

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

    # ---- client -> inbox --------------------------------------------------------------------

    def _on_connect(self, namespace, sid, environ, auth=None):
        if self._closing:
            raise SioConnectionRefused(CLOSING)
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, namespace)
        client = Client(sid, namespace, eio_sid, self.client_info(sid, namespace, environ),
                        self.config.rate_burst)
        self.clients[sid] = client
        envelope = Envelope("connect", namespace, sid, self.id, self.get_client_info(client),
                            environ=safe_environ(environ), auth=auth)
        verdict = gevent.event.AsyncResult()
        self._pending_connects[envelope.id] = verdict
        try:
            refusal = self._queue(envelope, client)
            if refusal is not None:
                self.clients.pop(sid, None)
                raise SioConnectionRefused(refusal)
            try:
                ok, error = verdict.get(timeout=self.config.connect_timeout)
            except gevent.Timeout:
                ok, error = self.config.connect_timeout_accept, "no answer from the app"
                self.logger.warning("io-node %s: no connect verdict for %s in %.1fs, %s it",
                                    self.id, sid, self.config.connect_timeout,
                                    "accepting" if ok else "refusing")
                if not ok:
                    # the app tier will see the connect later: pair it with a disconnect
                    self._enqueue(Envelope("disconnect", namespace, sid, self.id,
                                           client.info, reason="connect timed out"), client)
        finally:
            self._pending_connects.pop(envelope.id, None)
        if not ok:
            self.clients.pop(sid, None)
            if isinstance(error, dict):
                raise SioConnectionRefused(error.get("message"), *(
                    [error["data"]] if error.get("data") is not None else []))
            raise SioConnectionRefused(error or "connection refused")
        self.fire("socket connection", client)
        return True

    def _on_event(self, server, sid, eio_sid, data, namespace, ack_id):
        client = self.clients.get(sid)
        if client is None:
            return
        event, args = data[0], data[1:]
        if not self._take_token(client):
            self._refuse(client, event, ack_id, "rate limit exceeded, slow down")
            return
        envelope = Envelope("event", namespace, sid, self.id, self.get_client_info(client),
                            event=event, args=args, ack=ack_id is not None)
        if ack_id is not None:
            self._pending_acks[envelope.id] = (eio_sid, namespace, ack_id,
                                               time.monotonic() + self.config.ack_timeout)
        refusal = self._queue(envelope, client, ack_id)
        if refusal is not None:
            self._pending_acks.pop(envelope.id, None)
            self._refuse(client, event, ack_id, refusal)
            return
        self.fire("socket message", client, event, args)

    def _on_disconnect(self, namespace, sid, reason=None):
        client = self.clients.pop(sid, None)
        if client is None:
            return
        envelope = Envelope("disconnect", namespace, sid, self.id, self.get_client_info(client),
                            reason=str(reason) if reason is not None else None)
        refusal = self._queue(envelope, client)
        if refusal is not None:
            self.logger.error("io-node %s: the disconnect of %s cannot be encoded (%s); the "
                              "reaper will tell the app tier when this node stops",
                              self.id, sid, refusal)
        self.fire("socket disconnect", client)

    def _take_token(self, client: Client) -> bool:
        rate = self.config.rate_limit
        if not rate:
            return True
        now = time.monotonic()
        client.tokens = min(self.config.rate_burst, client.tokens + (now - client.stamp) * rate)
        client.stamp = now
        if client.tokens < 1:
            return False
        client.tokens -= 1
        return True

    def _refuse(self, client: Client, event: str, ack_id, reason: str) -> None:
        """Tell a client its message was not taken: by its ack, and by an ``error`` event."""
        self.logger.warning("io-node %s: refused %r from %s: %s", self.id, event, client.sid,
                            reason)
        if ack_id is not None:
            self._send_ack(client.eio_sid, client.namespace, ack_id,
                           [{"ok": False, "error": reason}])
        self.sio.emit("error", {"event": event, "error": reason}, to=client.sid,
                      namespace=client.namespace)

    def _enqueue(self, envelope: Envelope, client: Client, wait: bool = False) -> bool:
        """Queue an envelope for the inbox; False when it was refused (see `_queue`)."""
        return self._queue(envelope, client) is None

    def _queue(self, envelope: Envelope, client: Client, ack_id=None) -> Optional[str]:
        """Queue an envelope for the inbox, or say why not: too large, not text, or the
        outbox is full (Redis unreachable or slow). A disconnect is never turned away for
        space: there is one per client, so the outbox stays bounded all the same."""
        raw = envelope.encode()
        try:
            size = len(raw.encode("utf-8"))
        except UnicodeEncodeError:
            # a lone surrogate: Redis could never take it, and the pusher would retry forever
            return NOT_TEXT
        if envelope.kind != "disconnect":
            limit = self.config.max_message_size
            if size > limit:
                return f"message too large: {size} bytes, the limit is {limit} bytes"
            if self.outbox.qsize() + len(self._unsent) >= self.config.outbox_size:
                return OUTBOX_FULL
        record = None
        if envelope.kind == "connect":
            record = {"sid": client.sid, "namespace": client.namespace, "node": self.id,
                      "info": envelope.client, "connected_at": envelope.ts}
        self.outbox.put_nowait(Outgoing(raw, record, envelope, ack_id))
        return None

    def _push_step(self):
        """Send queued envelopes to the inbox, many per round trip, in order; resend after
        a failure; refuse what would take the inbox over ``inbox_maxlen``."""
        if not self._unsent:
            try:
                self._unsent.append(self.outbox.get(timeout=self.config.pop_timeout))
            except gevent.queue.Empty:
                return
            while len(self._unsent) < defaults.COMMAND_BATCH:
                try:
                    self._unsent.append(self.outbox.get_nowait())
                except gevent.queue.Empty:
                    break
        args = [self.config.inbox_maxlen]
        for item in self._unsent:
            args += [item.kind, item.raw]
        try:
            refused = self._push_batch(args)
        except NoScriptError:
            # Redis restarted or its scripts were flushed: load it again, then the batch
            # again (nothing of it was pushed; the client records are set twice, harmless)
            self.redis.script_load(_PUSH)
            refused = self._push_batch(args)
        self._redis_back()
        sent, self._unsent = self._unsent, []
        for index in refused:
            self._refused_by_inbox(sent[int(index)])

    def _push_batch(self, args: list) -> list:
        """One round trip: the push script by its sha, and the client records of connects
        (redis-py would ask ``SCRIPT EXISTS`` in a round trip of its own first)."""
        # one transaction: a connect's client record is there when an app-node pops it
        pipe = self.redis.pipeline(transaction=True)
        # LPUSH in order keeps the order for a consumer popping the other end
        pipe.evalsha(self._push.sha, 1, self.keys.inbox, *args)
        for item in self._unsent:
            if item.record is not None:
                self.state.add_client(item.record, pipe)
        return pipe.execute()[0]

    def _refused_by_inbox(self, item: Outgoing) -> None:
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

    def _stream_tip(self, stream: str):
        """The last id of a stream, and how many entries were ever added to it (Redis 7)."""
        try:
            info = self.redis.xinfo_stream(stream)
        except ResponseError:
            return "0-0", 0          # no such stream yet
        added = info.get("entries-added")
        return info["last-generated-id"], int(added) if added is not None else None

    def _check_streams(self) -> None:
        """Warn, with how many, when command batches this io-node had not read yet were
        trimmed away (``stream_maxlen``) during an outage or while it lagged behind."""
        for stream, last in list(self.last_ids.items()):
            seq = self._stream_seq.get(stream)
            try:
                info = self.redis.xinfo_stream(stream)
            except ResponseError:
                continue             # no such stream (yet)
            added = info.get("entries-added")
            if seq is None or added is None:
                continue             # Redis < 7 does not count what it trimmed
            trimmed = int(added) - int(info["length"])
            if int(added) < seq:
                # the stream was deleted and made anew: count from here
                self._stream_seq[stream] = trimmed
            elif trimmed > seq:
                first = info.get("first-entry")
                first_id = first[0] if first else info["last-generated-id"]
                span = (_stream_id(first_id)[0] - _stream_id(last)[0]) / 1000
                self.logger.warning(
                    "io-node %s: %d command batch(es) of %s, written in the %.1fs after %s, "
                    "were trimmed before this io-node read them (the stream keeps about %d); "
                    "its clients missed those commands. Raise STREAM_MAXLEN to ride out "
                    "longer outages.", self.id, trimmed - seq, stream, max(0.0, span), last,
                    self.config.stream_maxlen)
                self._stream_seq[stream] = trimmed

    def _redis_back(self) -> None:
        was_down = self._redis_down_since is not None
        super()._redis_back()
        if was_down:
            self._check_streams_due = True

    def reaped(self) -> None:
        """The cluster took this io-node for dead and told the app tier its clients left:
        close their connections so they reconnect and connect anew."""
        super().reaped()
        clients, self.clients = self.clients, {}
        for eio_sid in {client.eio_sid for client in clients.values()}:
            try:
                self.sio.eio.disconnect(eio_sid)
            except Exception:
                self.logger.exception("io-node %s: closing %s", self.id, eio_sid)

    def _listen_step(self):
        if self._check_streams_due:
            self._check_streams()
            self._check_streams_due = False
        count = defaults.COMMAND_BATCH
        try:
            reply = self.redis.xread(dict(self.last_ids), count=count,
                                     block=int(self.config.pop_timeout * 1000))
        except REDIS_DOWN:
            # whatever was trimmed meanwhile is told before anything newer is applied
            self._check_streams_due = True
            raise
        self._redis_back()
        if not reply:
            return
        entries, cap = [], None
        for stream, items in reply:
            entries.extend((_stream_id(entry_id), stream, entry_id, fields)
                           for entry_id, fields in items)
            if len(items) >= count:
                # this stream may have more: apply nothing newer than its last entry yet,
                # so commands of the two streams stay in the order they were written
                last = _stream_id(items[-1][0])
                cap = last if cap is None else min(cap, last)
                # far behind: make sure nothing is trimmed before we get there
                self._check_streams_due = True
        entries.sort(key=lambda e: e[0])
        for key, stream, entry_id, fields in entries:
            if cap is not None and key > cap:
                break
            self.last_ids[stream] = entry_id
            if self._stream_seq.get(stream) is not None:
                self._stream_seq[stream] += 1
            try:
                commands = decode_batch(fields.get("b"))
            except MessageError as exc:
                self.logger.error("io-node %s: skipped malformed command entry %s in %s: %s",
                                  self.id, entry_id, stream, exc)
                continue
            for command in commands:
                try:
                    self.apply(command)
                except Exception:
                    self.logger.exception("io-node %s: command %r failed", self.id, command)

    def apply(self, command: dict) -> None:
        """Apply one command to the clients held here; others' clients are not touched."""
        method = command["m"]
        sio = self.sio
        ns = command.get("ns", "/")
        if method == "emit":
            args = unpack_args(command)
            sio.emit(command["event"], args_to_data(args) if args else None,
                     to=command.get("to"), skip_sid=command.get("skip"), namespace=ns)
            self.fire("app publish", command)
        elif method in ("enter_room", "leave_room"):
            sid = command["sid"]
            if self.holds(sid, ns):
                if method == "enter_room":
                    sio.enter_room(sid, command["room"], namespace=ns)
                    self.fire("app subscribe-to-channel", command)
                else:
                    sio.leave_room(sid, command["room"], namespace=ns)
                    self.fire("app unsubscribe-from-channel", command)
        elif method == "close_room":
            sio.close_room(command["room"], namespace=ns)
        elif method == "disconnect":
            if self.holds(command["sid"], ns):
                sio.disconnect(command["sid"], namespace=ns)
        elif method == "ack":
            pending = self._pending_acks.pop(command["id"], None)
            if pending is not None:
                eio_sid, namespace, ack_id, _ = pending
                self._send_ack(eio_sid, namespace, ack_id, unpack_args(command))
        elif method == "verdict":
            self._apply_verdict(command)
        elif method == "call":
            if self.holds(command["sid"], ns):
                args = unpack_args(command)
                reply_key = command["reply"]
                sio.emit(command["event"], args_to_data(args) if args else None,
                         to=command["sid"], namespace=ns,
                         callback=lambda *answer: self._reply(reply_key, answer))
        elif method == "app":
            self.fire(f"app {command['type']}", command)

    def holds(self, sid: str, namespace: str) -> bool:
        """Whether this io-node holds the client (connected, or connecting right now)."""
        manager = self.sio.manager
        return manager.is_connected(sid, namespace) or manager.is_pre_connected(sid, namespace)

    def _apply_verdict(self, command: dict) -> None:
        pending = self._pending_connects.get(command["id"])
        ok, error = bool(command["ok"]), command.get("error")
        if pending is not None:
            pending.set((ok, error))
            return
        sid, ns = command.get("sid"), command.get("ns", "/")
        if not ok and sid and self.sio.manager.is_connected(sid, ns):
            # the verdict came after the timeout let the client in: honour it now
            self.sio.disconnect(sid, namespace=ns)

    def _send_ack(self, eio_sid, namespace, ack_id, args: List[Any]) -> None:
        self.sio._send_packet(eio_sid, self.sio.packet_class(
            sio_packet.ACK, namespace=namespace, id=ack_id, data=list(args)))

    def _reply(self, key: str, answer) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(key, dumps(pack_args(answer)))
        pipe.expire(key, 60)
        pipe.execute()

    def _sweep_step(self):
        """Forget acks nobody answered in time, so memory stays bounded."""
        self.stopping.wait(min(5.0, self.config.ack_timeout))
        now = time.monotonic()
        expired = [k for k, v in self._pending_acks.items() if v[3] < now]
        for key in expired:
            eio_sid, namespace, ack_id, _ = self._pending_acks.pop(key)
            self._send_ack(eio_sid, namespace, ack_id,
                           [{"ok": False, "error": "no answer from the app in time"}])


def main(argv=None) -> None:
    from .config import Config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import argparse

    parser = argparse.ArgumentParser(prog="python -m siocluster.ionode",
                                     description="Run an io-node: Socket.IO connections <-> Redis.")
    config, _ = Config.load(argv, parser=parser)
    node = IoNode(config)
    try:
        node.check_redis()
    except RuntimeError as exc:      # Redis unreachable, a wrong password: already says what to do
        raise SystemExit(f"io-node: {exc}")
    # listening before registering: the frontend-node lists registered io-nodes to browsers
    try:
        node.start_server()
    except OSError as exc:
        raise SystemExit(listen_error("io-node", exc, config.http_host, config.http_port))
    node.start()
    logging.getLogger("siocluster").info("io-node %s listening on %s:%s", node.id,
                                         *node.address[:2])
    node.run_until_signalled("stopping")


if __name__ == "__main__":
    # the canonical module's main, not this __main__ copy: its classes would be strangers
    # to the ones the application imports from siocluster
    from siocluster.ionode import main as _main

    _main()
