"""The io-node's Engine.IO server: python-engineio, with lean websocket connections.

In gevent mode engineio gives every websocket connection three greenlets (its reader, a
writer waiting on a queue, a ping sleeper) and sends every packet through that queue. An
io-node holds many mostly idle connections and fans each message out to many, so here:

- a websocket connection has one greenlet, its reader. A packet is written where it is
  sent, and a broadcast's frame is encoded once and written to each recipient (`emit`).
- a write never blocks the sender. What the kernel does not take at once waits in the
  connection's backlog, drained by a greenlet that exists only while there is one; a
  client whose backlog passes ``max_send_backlog`` bytes is too slow to keep and is cut
  off, so one slow reader neither stalls the others nor grows the io-node's memory.
- one greenlet sends every connection's pings, in the order they fall due.

Polling connections, and a connection's polling phase before it upgrades, keep engineio's
queue, bounded too (`siocluster.transport`), as are a websocket message being read, an
upgrade's probe and a message's attachments. `IoSocketServer` runs this engine::

    sio = IoSocketServer(async_mode="gevent", max_send_backlog=4 << 20, max_attachments=10)

The one module that reaches into private names of python-engineio, python-socketio, gevent
and gevent-websocket (the functions at its end serve the io-node and the app), each use
saying why; setup.cfg pins the versions of `TESTED_WITH`, and tests/test_engine.py checks
that every name it relies on is there.
"""

import logging
from logging import INFO

import engineio
import gevent
import socketio
from engineio import packet as eio_packet
from engineio.socket import Socket
from socketio import packet as sio_packet

from . import defaults
from .envelope import args_to_data, event_data, parse
from .ioclient import shown
from .recovering import IoManager
from .transport import (
    FrameWriter,
    Holding,
    MessageCap,
    Pinger,
    PollingBounds,
    attachment_count,
    event_packet,
    message_frame,
    websocket_frame,
)

# the versions this module was written and tested against (setup.cfg pins the same ranges)
TESTED_WITH = {"python-engineio": "4.15", "python-socketio": "5.18", "gevent-websocket": "0.10"}
# engineio's own logger stays quiet unless asked (engineio_logger=True); a slow client cut
# off is the io-node's news
logger = logging.getLogger("siocluster.io-node")


class EngineSocket(PollingBounds, Socket):
    """An engineio socket that writes its websocket frames itself (see the module)."""

    writer = None        # a FrameWriter once the socket is on websocket
    _websocket = None    # gevent-websocket's WebSocket, while the reader runs

    def send(self, pkt):
        writer = self.writer
        if writer is None:
            super().send(pkt)                          # engineio's queue
            return self.queued_packet(len(websocket_frame(pkt)))
        if not self.closed:
            writer.write(websocket_frame(pkt))

    def schedule_ping(self):
        # as engineio: a new ping only once the last one was answered
        if self.last_ping:
            self.last_ping = None
            self.server.pinger.schedule(self)

    def close(self, wait=True, abort=False, reason=None):
        writer = self.writer
        if writer is None:
            return super().close(wait=wait, abort=abort, reason=reason)
        if self.closed or self.closing:
            return
        self.closing = True
        if self.cut_off:
            reason = self.server.reason.SERVER_DISCONNECT
        self.server._trigger_event("disconnect", self.sid,
                                   reason or self.server.reason.SERVER_DISCONNECT,
                                   run_async=False)
        if not abort:
            self.send(eio_packet.Packet(eio_packet.CLOSE))
        self.closed = True
        # what engineio's writer did as it ended: the websocket's close frame, after the
        # backlog; the client answers it and the reader ends
        websocket = self._websocket
        if websocket is not None and not websocket.closed:
            websocket.close()
        if reason == self.server.reason.PING_TIMEOUT:
            # a client that stopped answering pings may be gone without a word (a half-open
            # connection): waiting for it to answer the close frame could take forever
            writer.shutdown()

    def _websocket_handler(self, ws):
        websocket = getattr(ws, "_sock", None)      # gevent-websocket's WebSocket
        sock = getattr(getattr(websocket, "handler", None), "socket", None)
        # a gevent socket, with the real (non-blocking) socket under it
        if not hasattr(getattr(sock, "_sock", None), "send") or not hasattr(websocket,
                                                                              "raw_write"):
            # another websocket server: engineio's own handler, writer greenlet and all
            return super()._websocket_handler(ws)
        server = self.server
        # engineio checks a message's size once it is whole; this stops reading it at the cap
        cap = MessageCap(websocket, server.max_http_buffer_size, self.sid)

        def websocket_wait():
            data = ws.wait()
            cap.reset()
            return data

        if self.connected:
            # an upgrade from polling, within the handshake timeout: a client that opens a
            # websocket and says nothing holds its greenlet no longer
            self.upgrading = True
            with gevent.Timeout(server.handshake_timeout, False):
                self.upgraded = self._probe(ws, websocket_wait)
            self.upgrading = False
            if not self.upgraded:
                return []
        else:
            self.connected = True
            self.upgraded = True

        writer = FrameWriter(sock, sock._sock, server.max_send_backlog, self._overflowed)
        websocket.raw_write = writer.write      # gevent-websocket's own frames go in order too
        # what was sent before (the open packet, or packets sent during the upgrade) first;
        # nothing here yields, so no packet can pass them
        while not self.queue.empty():
            pkt = self.queue.get_nowait()
            self.queue.task_done()
            if pkt is not None:
                writer.write(websocket_frame(pkt))
        self.writer, self._websocket = writer, websocket
        fast_event = getattr(server, "fast_event", None)

        try:
            while not self.closed:
                try:
                    data = websocket_wait()
                except Exception as exc:
                    if not self.closed:
                        server.logger.info("%s: websocket error %r, closing", self.sid, exc)
                    break
                if data is None:
                    break          # the client closed the connection
                try:
                    # a client's event: straight to the handler, without two packet objects
                    if not (fast_event and data.__class__ is str and data[:2] == "42"
                            and fast_event(self.sid, data)):
                        self.receive(eio_packet.Packet(encoded_packet=data))
                except engineio.exceptions.UnknownPacketError:
                    pass
                except engineio.exceptions.SocketIsClosedError:
                    break
                except Exception:
                    server.logger.exception("%s: receive error", self.sid)
                    break
        finally:
            writer.finish(timeout=5.0)
            self.close(wait=False, abort=True, reason=server.reason.TRANSPORT_CLOSE)
            self._websocket = None
        return []

    def _probe(self, ws, websocket_wait) -> bool:
        """An upgrade's probe, as engineio does it: True once the client sent its upgrade."""
        pkt = eio_packet.Packet(encoded_packet=websocket_wait())
        if pkt.packet_type != eio_packet.PING or pkt.data != "probe":
            return False
        ws.send(eio_packet.Packet(eio_packet.PONG, data="probe").encode())
        self.queue.put(eio_packet.Packet(eio_packet.NOOP))     # ends the pending poll
        return eio_packet.Packet(encoded_packet=websocket_wait()).packet_type == \
            eio_packet.UPGRADE


class EngineServer(engineio.Server):
    """``engineio.Server`` whose websocket connections are `EngineSocket`s.

    :param max_send_backlog: bytes that may wait for one slow client before it is
        disconnected.
    :param handshake_timeout: seconds a client has to finish an upgrade to websocket.

    Every other parameter is engineio's.
    """

    def __init__(self, *args, max_send_backlog: int = defaults.MAX_SEND_BACKLOG,
                 handshake_timeout: float = defaults.HANDSHAKE_TIMEOUT, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_send_backlog = max_send_backlog
        self.handshake_timeout = handshake_timeout
        self.pinger = Pinger(self)

    def shutdown(self):
        super().shutdown()
        self.pinger.stop()

    def _handle_connect(self, environ, start_response, transport, jsonp_index=None):
        """engineio's connect (a private method, copied from 4.15), with an `EngineSocket`."""
        if self.start_service_task:
            # the task that closes sockets whose client stopped answering pings
            self.start_service_task = False
            self.service_task_handle = self.start_background_task(self._service_task)
        sid = self.generate_id()
        s = EngineSocket(self, sid)
        self.sockets[sid] = s
        s.send(eio_packet.Packet(eio_packet.OPEN, {
            "sid": sid,
            "upgrades": self._upgrades(sid, transport),
            "pingTimeout": int(self.ping_timeout * 1000),
            "pingInterval": int(self.ping_interval + self.ping_interval_grace_period) * 1000,
            "maxPayload": self.max_http_buffer_size,
        }))
        ret = self._trigger_event("connect", sid, environ, run_async=False)
        if ret is not None and ret is not True:
            del self.sockets[sid]
            self.logger.warning("Application rejected connection")
            return self._unauthorized(ret or None)
        s.schedule_ping()
        if transport == "websocket":
            ret = s.handle_get_request(environ, start_response)
            if s.closed and sid in self.sockets:
                del self.sockets[sid]
            return ret
        s.connected = True
        headers = None
        if self.cookie:
            cookie = self.cookie if isinstance(self.cookie, dict) else {
                "name": self.cookie, "path": "/", "SameSite": "Lax"}
            headers = [("Set-Cookie", self._generate_sid_cookie(sid, cookie))]
        try:
            return self._ok(s.poll(), headers=headers, jsonp_index=jsonp_index)
        except engineio.exceptions.QueueEmpty:
            return self._bad_request()


class IoSocketServer(socketio.Server):
    """A ``socketio.Server`` on `EngineServer`: what an io-node runs by default. Pass one
    of your own to `IoNode` (the seed's ``makeIoServer``) to keep its options; a plain
    ``socketio.Server`` works too, with engineio's heavier connections.

    :param max_attachments: binary attachments one message may announce; a client that
        announces more is disconnected. Other parameters are python-socketio's and
        `EngineServer`'s.

    ``recovery`` (the io-node sets it) recovers connections: ``returning(eio_sid, namespace,
    auth)`` gives the sid a client comes back as (None: new) and the auth to pass on,
    ``connect_fields(sid, namespace)`` what the CONNECT adds (the pid), ``connected(...)``.
    """

    def __init__(self, *args, max_attachments: int = defaults.MAX_ATTACHMENTS, **kwargs):
        kwargs.setdefault("client_manager", IoManager())
        super().__init__(*args, **kwargs)
        self.max_attachments = max_attachments
        self.recovery = None
        self.returning_sids = {}        # (eio sid, namespace) -> the sid it comes back as
        # packets held for a connection until its CONNECT (a returning client's: its replay)
        self.held = Holding(defaults.HELD_PACKETS)
        self.eio.fast_event = self._fast_event

    def _fast_event(self, eio_sid: str, text: str) -> bool:
        """Handle a client's event as python-socketio's ``_handle_eio_message`` and
        ``_handle_event`` would, without their packet objects; False: theirs to handle (an
        attachment expected, async handlers, their info logs on, another form)."""
        if eio_sid in self._binary_packet or self.async_handlers or \
                self.logger.isEnabledFor(INFO) or self.eio.logger.isEnabledFor(INFO):
            return False
        event = event_packet(text, self.packet_class.json.loads)
        if event is None:
            return False
        namespace, ack_id, data = event
        sid = self.manager.sid_from_eio_sid(eio_sid, namespace)
        if not self.manager.is_connected(sid, namespace):
            return False        # python-socketio logs it
        self._handle_event_internal(self, sid, eio_sid, data, namespace, ack_id)
        return True

    def _handle_connect(self, eio_sid, namespace, data):
        hooks, namespace = self.recovery, namespace or "/"
        if hooks is None:
            return super()._handle_connect(eio_sid, namespace, data)
        self.held.start(eio_sid)
        sid, data = hooks.returning(eio_sid, namespace, data)
        if sid is not None:
            self.returning_sids[(eio_sid, namespace)] = sid
        try:
            super()._handle_connect(eio_sid, namespace, data)
        finally:
            self.returning_sids.pop((eio_sid, namespace), None)
            try:
                hooks.connected(eio_sid, namespace, sid)
            finally:
                now = self.manager.sid_from_eio_sid(eio_sid, namespace)
                self.release(eio_sid, drop=now is None
                             or not self.manager.is_connected(now, namespace))

    def release(self, eio_sid: str, drop: bool = False) -> None:
        """Send what was held for a connection, in order (``drop``: refused, or superseded
        by the replay of what a returning client missed)."""
        held = self.held.pop(eio_sid)
        if not held or drop or eio_sid not in self.eio.sockets:
            return
        if held[-1] is None:      # past the bound: it would miss packets, so it goes
            self.eio.sockets[eio_sid].close(wait=False, abort=True)
            return
        for raw, pkt in held:
            if raw:
                super()._send_eio_packet(eio_sid, pkt)
            else:
                super()._send_packet(eio_sid, pkt)

    def _send_eio_packet(self, eio_sid, eio_pkt):
        if self.held and eio_sid in self.held:
            return self.held.put(eio_sid, True, eio_pkt)
        super()._send_eio_packet(eio_sid, eio_pkt)

    def _send_packet(self, eio_sid, pkt):
        if pkt.packet_type in (sio_packet.CONNECT, sio_packet.CONNECT_ERROR):
            if pkt.packet_type == sio_packet.CONNECT and self.recovery is not None \
                    and isinstance(pkt.data, dict) and "sid" in pkt.data:
                pkt.data.update(self.recovery.connect_fields(pkt.data["sid"],
                                                             pkt.namespace or "/"))
        elif self.held and eio_sid in self.held:
            return self.held.put(eio_sid, False, pkt)
        super()._send_packet(eio_sid, pkt)

    def _handle_eio_disconnect(self, eio_sid, reason):
        if reason == self.reason.CLIENT_DISCONNECT and self.recovery is not None:
            # the client closed its connection, not its namespaces (a DISCONNECT packet says
            # that): "transport close", as socket.io says; it may come back as itself
            reason = self.reason.TRANSPORT_CLOSE
        super()._handle_eio_disconnect(eio_sid, reason)

    def _engineio_server_class(self):
        return EngineServer

    def _handle_eio_message(self, eio_sid, data):
        # python-socketio keeps every attachment a message announces (up to 10 digits of
        # them) until the last arrives: the count is checked before it starts
        count = attachment_count(data)
        if count > self.max_attachments:
            logger.warning("%s: a message announcing %d attachments (max_attachments is %d): "
                           "disconnected; it began %s", eio_sid, count, self.max_attachments,
                           shown(data))
            sock = self.eio.sockets.get(eio_sid)
            if sock is not None:         # no waiting for a polling client to come for it
                sock.close(wait=False, reason=self.eio.reason.SERVER_DISCONNECT)
            return
        super()._handle_eio_message(eio_sid, data)


# ---- what the io-node and the app need of python-socketio's and engineio's insides --------

def hook_events(sio: socketio.Server, handler) -> None:
    """Route clients' events to ``handler(server, sid, eio_sid, data, namespace, ack_id)``:
    an io-node's answer to an ack comes later, from an app-node, so it needs the ack id, and
    this private method is the one place python-socketio hands it over."""
    sio._handle_event_internal = handler


def send_ack(sio: socketio.Server, eio_sid: str, namespace: str, ack_id, args,
             binary: bool = True) -> None:
    """Answer a client's event ``ack_id`` with ``args`` (a list or a JSON array's text), later
    than python-socketio would (``binary=False``: the caller knows there are no bytes)."""
    writer = _writer(*_where(sio), eio_sid)
    encoded = writer and _encoded(sio, sio_packet.ACK, namespace, args, ack_id, binary)
    if isinstance(encoded, str):
        return writer.write(message_frame(encoded))
    data = parse(args) if isinstance(args, str) else list(args)
    sio._send_packet(eio_sid, sio.packet_class(sio_packet.ACK, namespace=namespace, id=ack_id,
                                               data=data))


def _encoded(sio: socketio.Server, kind: int, namespace: str, data, id=None,
             binary: bool = True):
    """A packet as python-socketio encodes it (a list when binary), with no packet object
    when ``data`` is known to hold no bytes, and no encoding when it is JSON text."""
    if not isinstance(data, str):
        if binary:
            return sio.packet_class(kind, namespace=namespace, id=id, data=list(data)).encode()
        data = sio.packet_class.json.dumps(list(data), separators=(",", ":"))
    head = str(kind) if namespace == "/" else f"{kind}{namespace},"
    return (head if id is None else f"{head}{id}") + data


def emit(sio: socketio.Server, event: str, args, to=None, skip=None,
         namespace: str = "/", binary: bool = True) -> None:
    """``sio.emit(event, *args, to=to, skip_sid=skip, namespace=namespace)`` (``args``: a list
    or a JSON array's text), the frame written straight to each websocket client's
    `FrameWriter`, not down python-socketio's five layers per recipient; polling or held
    clients, several rooms, bytes, another client manager: python-socketio's way."""
    manager = sio.manager
    simple = type(manager) in (IoManager, socketio.Manager) and isinstance(to, (str, type(None)))
    room = manager.rooms.get(namespace, {}).get(to) if simple else None
    if simple and not room:
        return
    data = event_data(event, args) if isinstance(args, str) else [event, *args]
    encoded = simple and _encoded(sio, sio_packet.EVENT, namespace, data, binary=binary)
    if not isinstance(encoded, str):      # another manager, several rooms, or bytes
        args = parse(args) if isinstance(args, str) else args
        return sio.emit(event, args_to_data(args) if args else None, to=to, skip_sid=skip,
                        namespace=namespace)
    frame, skip = message_frame(encoded), skip if isinstance(skip, list) else (skip,)
    sockets, held = _where(sio)
    # a copy: a write can cut a slow client off, and its disconnect leaves the room
    for sid, eio_sid in list(room.items()):
        if sid in skip:
            continue
        writer = _writer(sockets, held, eio_sid)
        if writer is None:
            sio._send_eio_packet(eio_sid, eio_packet.Packet(eio_packet.MESSAGE, encoded))
        else:
            writer.write(frame)


def _writer(sockets: dict, held, eio_sid: str):
    """The `FrameWriter` a packet for ``eio_sid`` may be written to now, or None (polling,
    closed, held until its CONNECT, not an `EngineSocket`); ``sockets, held``: `_where`'s."""
    sock = sockets.get(eio_sid)
    writer = getattr(sock, "writer", None)
    return None if writer is None or sock.closed or eio_sid in held else writer


def _where(sio: socketio.Server):
    return sio.eio.sockets, getattr(sio, "held", None) or ()


def origin_allowed(sio: socketio.Server, environ: dict) -> bool:
    """Whether a request's ``Origin`` may open a connection, by the very rule Engine.IO
    applies (``cors_allowed_origins``), which it keeps private."""
    origin = environ.get("HTTP_ORIGIN")
    eio = sio.eio
    if not origin or eio.cors_allowed_origins == []:
        return True
    allowed = eio._cors_allowed_origins(environ)
    return allowed is None or origin in allowed


def bind_namespace(namespace_handler: socketio.Namespace, app) -> None:
    """Bind a class-based namespace to ``app`` as python-socketio's server binds its own."""
    namespace_handler._set_server(app)
