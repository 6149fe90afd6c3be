"""What the io-node's Engine.IO connections need besides engineio's own code, with no private
name of any dependency: one greenlet for every connection's pings, and the bounds on what a
client may make the io-node hold: packets waiting for a polling client, a websocket message
being read, the attachments a binary message announces; a packet's websocket frame, encoded
once for all its recipients; the writer that sends a websocket connection's frames without
ever blocking the io-node (`corked` joins the frames a batch of commands sends one connection
into one send), and wsaccel's unmasking of the frames it reads.

`siocluster.engine` uses these; nothing here is needed to run an io-node by hand.
"""

import collections
import contextlib
import logging
import re
import socket as stdlib_socket
import ssl
import struct
import time

import gevent
import gevent.ssl
from engineio import packet as eio_packet
from geventwebsocket.exceptions import WebSocketError
from socketio import packet as sio_packet

from .envelope import has_binary

TLS_SOCKETS = (ssl.SSLSocket, gevent.ssl.SSLSocket)      # the standard library's, gevent's

_PING = eio_packet.Packet(eio_packet.PING)
CLOSE_TOO_BIG = 1009       # RFC 6455: a message too big to process

logger = logging.getLogger("siocluster.io-node")


class Pinger:
    """Sends the pings of every connection of a server from one greenlet. Every socket
    waits the same interval, so a FIFO keeps them in the order they fall due."""

    def __init__(self, server):
        self.server = server
        self.due = collections.deque()
        self.greenlet = None

    def schedule(self, socket) -> None:
        self.due.append((time.monotonic() + self.server.ping_interval, socket))
        if self.greenlet is None:
            self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        due = self.due
        try:
            while due:
                when, socket = due[0]
                delay = when - time.monotonic()
                if delay > 0:
                    gevent.sleep(delay)
                    continue
                due.popleft()
                if not socket.closing and not socket.closed:
                    socket.last_ping = time.time()
                    try:
                        socket.send(_PING)
                    except Exception:
                        self.server.logger.exception("ping to %s failed", socket.sid)
        finally:
            self.greenlet = None

    def stop(self) -> None:
        self.due.clear()
        if self.greenlet is not None:
            self.greenlet.kill(block=False)


class PollingBounds:
    """For an engineio ``Socket``: bounds on what waits in its queue for a polling client.

    engineio's queue has no bound of its own, and a polling client that sends pongs unasked
    is never timed out while it no longer comes for its packets. With this mixin a client
    is cut off (as a websocket client too slow to read) once the packets waiting pass the
    server's ``max_send_backlog`` bytes, and timed out (as a client that stops answering
    pings) when packets have waited ``ping_timeout`` seconds with no request for them. The
    socket's ``send`` calls `queued_packet` for each packet it queues.
    """

    queued = 0           # bytes waiting in the queue since the last request took them
    cut_off = False      # the server ended it (too slow): not a drop it may come back from
    polled = None        # when a request last took them (monotonic); None while one waits

    def queued_packet(self, size: int) -> None:
        """Count ``size`` bytes more waiting; past ``max_send_backlog``, cut the client off."""
        if self.closing or self.closed:
            return
        self.queued += size
        if self.queued > self.server.max_send_backlog:
            self._overflowed(self.queued)
            self.close(wait=False, abort=True)

    def poll(self):
        self.polled = None          # a request waits: what is sent goes out at once
        try:
            return super().poll()
        finally:
            self.queued = 0         # engineio took every packet waiting, without yielding
            self.polled = time.monotonic()

    def check_ping_timeout(self):
        polled = self.polled
        if (polled is not None and self.queued and not (self.upgrading or self.upgraded)
                and not self.closing and time.monotonic() - polled > self.server.ping_timeout):
            logger.info("%s: no request for its packets in %ss (ping_timeout): disconnected",
                        self.sid, self.server.ping_timeout)
            self.close(wait=False, abort=True, reason=self.server.reason.PING_TIMEOUT)
            return False
        return super().check_ping_timeout()

    def _overflowed(self, waiting: int) -> None:
        self.cut_off = True
        self.server.slow_clients_cut = getattr(self.server, "slow_clients_cut", 0) + 1
        logger.warning(
            "%s: client too slow, %d bytes waiting for it (max_send_backlog is %d): "
            "disconnected", self.sid, waiting, self.server.max_send_backlog)


class MessageTooBig(WebSocketError):
    """A client's websocket message, still being read, passed the size limit."""


class MessageCap:
    """Bounds the bytes of one websocket message as gevent-websocket assembles it.

    gevent-websocket reads a frame's whole payload as its header announces it, and appends
    fragments until the final one, with no limit: engineio's size check comes only once the
    message is complete. This counts every payload before it is read; past ``limit`` bytes
    in one message the connection is closed with 1009 and nothing more is read::

        cap = MessageCap(websocket, limit, sid)    # then, after each message read:
        cap.reset()
    """

    def __init__(self, websocket, limit: int, label: str):
        self.websocket, self.limit, self.label = websocket, limit, label
        self.read = websocket.raw_read      # only payloads go through it, headers do not
        self.taken = 0
        websocket.raw_read = self.raw_read

    def reset(self) -> None:
        """A message was read whole: the next one starts from nothing."""
        self.taken = 0

    def raw_read(self, count: int):
        self.taken += count
        if self.taken > self.limit:
            logger.warning("%s: websocket message of more than %d bytes (max_http_buffer_size): "
                           "closed with %d", self.label, self.limit, CLOSE_TOO_BIG)
            # gevent-websocket's close() would send the close frame without the code (0.10
            # writes the reason alone); receive() cleans up as close() does once this raises
            websocket = self.websocket
            websocket.send_frame(struct.pack("!H", CLOSE_TOO_BIG) + b"message too big",
                                 websocket.OPCODE_CLOSE)
            websocket.closed = True
            # gevent-websocket ends the read as for a connection lost: receive() gives None
            raise MessageTooBig(f"more than {self.limit} bytes")
        return self.read(count)


def attachment_count(data) -> int:
    """The attachments a Socket.IO packet announces: ``5<count>-...`` (a binary event) or
    ``6<count>-...`` (a binary ack); 0 for any other packet."""
    if not isinstance(data, str) or data[:1] not in ("5", "6"):
        return 0
    # python-socketio reads at most 10 digits (more, it refuses the packet itself)
    dash = data.find("-", 1, 13)
    count = data[1:dash] if dash > 1 else ""
    return int(count) if count.isascii() and count.isdigit() else 0


# a Socket.IO event in an Engine.IO message: 42[/namespace,][ack id][JSON array]
_EVENT = re.compile(r"42(?:(/[^,?]*),)?(\d{0,99})(\[.*)", re.S)


def event_packet(text: str, loads):
    """A client's event, ``42[/namespace,][ack id][...]``, read as python-socketio reads it:
    ``(namespace, ack id or None, data)``; None for any other packet or form (a namespace
    with a query, not a non-empty JSON array), left to python-socketio's own reading."""
    match = _EVENT.fullmatch(text)
    if match is None:
        return None
    try:
        data = loads(match[3])
    except ValueError:
        return None
    if data.__class__ is not list or not data:
        return None
    return match[1] or "/", int(match[2]) if match[2] else None, data


class IoPacket(sio_packet.Packet):
    """python-socketio's packet (``socketio.Server(serializer=IoPacket)``) with its
    ``data_is_binary`` answered the same way without a list built at each level: it runs
    on every event in and out (on io-nodes, JSON is set on this class alone, not on every
    python-socketio packet of the process)."""

    @classmethod
    def data_is_binary(cls, data) -> bool:
        return has_binary(data)


def websocket_frame(pkt: eio_packet.Packet) -> bytes:
    """The websocket frame of an Engine.IO packet (server to client: final, unmasked),
    encoded once per packet object: python-socketio hands every recipient of an emit the
    same packet, so a broadcast is encoded once."""
    frame = pkt.__dict__.get("ws_frame")
    if frame is None:
        # not encode() for binary: it keeps its first encoding for every later call, and a
        # polling client's must be base64
        data = pkt.data if pkt.binary else pkt.encode()
        text = isinstance(data, str)
        frame = pkt.ws_frame = _frame(0x81 if text else 0x82, data.encode() if text else data)
    return frame


def message_frame(encoded: str) -> bytes:
    """`websocket_frame`'s frame of an Engine.IO message of ``encoded``, with no packet."""
    return _frame(0x81, ("4" + encoded).encode())


def _frame(opcode: int, data: bytes) -> bytes:
    size = len(data)
    if size < 126:
        return struct.pack("!BB", opcode, size) + data
    if size < 65536:
        return struct.pack("!BBH", opcode, 126, size) + data
    return struct.pack("!BBQ", opcode, 127, size) + data


# the greenlet whose writes are held in a `corked` block, and the writers holding frames
_corker = None
_holding = []


@contextlib.contextmanager
def corked():
    """Hold the frames the calling greenlet writes in the block, and write each
    connection's in one send as it ends: a batch of commands that sends a client several
    frames (acks, its rooms' emits) costs one system call, not one per frame. A frame
    written to a connection already holding some, by any greenlet, joins them, so each
    connection's frames keep their order. Not nested: inside another greenlet's block,
    writes go out at once."""
    global _corker
    if _corker is not None:
        yield
        return
    _corker = gevent.getcurrent()
    try:
        yield
    finally:
        _corker = None
        writers = _holding[:]
        del _holding[:]
        for writer in writers:
            writer.release()


class FrameWriter:
    """Writes one connection's bytes in order without ever blocking the caller.

    :param sock: the connection's gevent socket, or gevent's TLS socket.
    :param raw: the real socket under it, non-blocking under gevent.
    :param limit: bytes that may wait for the client; past that it is cut off.
    :param on_overflow: called (once, with the bytes waiting) when the client is cut off.
    """

    __slots__ = ("_socket", "_raw", "_direct", "_backlog", "_waiting", "_limit", "_flusher",
                 "_on_overflow", "_held", "broken")

    def __init__(self, sock, raw, limit: int, on_overflow=None):
        self._socket = sock
        self._raw = raw
        # under TLS the real socket would carry frames in clear text: the flusher writes
        # them to the TLS one (whose writes the kernel did not take must be retried as is)
        self._direct = not isinstance(sock, TLS_SOCKETS)
        self._backlog = None              # bytes the kernel did not take yet, in order
        self._waiting = 0
        self._limit = limit
        self._flusher = None
        self._on_overflow = on_overflow
        self._held = None                 # frames held in a `corked` block, in order
        self.broken = False

    @property
    def waiting(self) -> int:
        """Bytes written but not yet taken by the kernel."""
        return self._waiting

    def write(self, data: bytes) -> None:
        if self.broken:
            return
        held = self._held
        if held is not None:
            held.append(data)
            return
        if _corker is not None and _corker is gevent.getcurrent():
            self._held = [data]
            _holding.append(self)
            return
        self._send(data)

    def release(self) -> None:
        """Write the frames held in a `corked` block, in one send."""
        held, self._held = self._held, None
        if held and not self.broken:
            self._send(held[0] if len(held) == 1 else b"".join(held))

    def _send(self, data: bytes) -> None:
        if self._flusher is None:
            sent = 0
            if self._direct:
                try:
                    sent = self._raw.send(data)
                except BlockingIOError:
                    pass
                except OSError:
                    # the reader sees the same error or the end of the stream and closes
                    self.broken = True
                    return
                if sent == len(data):
                    return
            data = data[sent:]
            self._backlog = []
            self._flusher = gevent.spawn(self._flush)
        self._backlog.append(data)
        self._waiting += len(data)
        if self._waiting > self._limit:
            self._cut(self._waiting)

    def _flush(self) -> None:
        try:
            while self._backlog:
                chunk = b"".join(self._backlog)
                self._backlog = []
                self._socket.sendall(chunk)
                self._waiting -= len(chunk)
        except OSError:
            self.broken = True
        finally:
            self._backlog = None
            self._waiting = 0
            self._flusher = None

    def _cut(self, waiting: int) -> None:
        self.broken = True
        self._backlog = []
        self.shutdown()
        if self._on_overflow is not None:
            self._on_overflow(waiting)

    def shutdown(self) -> None:
        """End the connection now: the reader wakes to the end of the stream and closes
        it as usual, whether or not the client is still there to answer."""
        try:
            self._raw.shutdown(stdlib_socket.SHUT_RDWR)
        except OSError:
            pass

    def finish(self, timeout: float) -> None:
        """Give the backlog ``timeout`` seconds to drain, then write nothing more."""
        flusher = self._flusher
        if flusher is not None:
            flusher.join(timeout)
            if not flusher.dead:
                flusher.kill(block=False)
        self.broken = True


def use_fast_websocket_reads() -> None:
    """Unmask clients' websocket frames with wsaccel's C code: gevent-websocket uses wsaccel's
    UTF-8 validator by itself, but unmasks in a Python loop over every byte (about 26 us for
    a short message). Called as the io-node starts; again, or without wsaccel, a no-op."""
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


def drop_connections(sio) -> list:
    """Drop every connection without a Socket.IO disconnect or even an Engine.IO close packet
    (after which python-socketio's client gives up): every client reconnects by itself."""
    sockets = list(sio.eio.sockets.values())
    for sock in sockets:
        try:
            # no waiting: a polling client may never come back for its last answer
            sock.close(wait=False, abort=True, reason=sio.eio.reason.SERVER_DISCONNECT)
        except Exception:
            logger.exception("closing %s", sock.sid)
    return sockets


def drop_connection(sio, eio_sid: str) -> None:
    """Drop one connection at once, without a word to the client (it came back elsewhere)."""
    sock = sio.eio.sockets.get(eio_sid)
    if sock is not None and not sock.closed:
        sock.close(wait=False, abort=True, reason=sio.eio.reason.TRANSPORT_CLOSE)


def sends_pending(sockets: list) -> bool:
    """Whether packets still wait in engineio's queue of a (polling) socket."""
    return any(not sock.queue.empty() for sock in sockets)


class Holding:
    """Packets held for connections whose CONNECT is not sent yet, in order, at most
    ``limit`` a connection: past that a ``None`` marks it (it would miss packets)."""

    def __init__(self, limit: int):
        self.lists = {}
        self.limit = limit

    def __bool__(self) -> bool:
        return bool(self.lists)

    def __contains__(self, eio_sid) -> bool:
        return eio_sid in self.lists

    def start(self, eio_sid: str) -> None:
        self.lists.setdefault(eio_sid, [])

    def put(self, eio_sid: str, raw: bool, pkt) -> None:
        held = self.lists[eio_sid]
        if len(held) < self.limit:
            held.append((raw, pkt))
        elif held[-1] is not None:
            held.append(None)
            logger.warning("%s: more than %d packets for it before its connect was answered: "
                           "it is disconnected once it is", eio_sid, self.limit)

    def pop(self, eio_sid: str):
        return self.lists.pop(eio_sid, None)
