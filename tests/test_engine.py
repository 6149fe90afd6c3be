"""The io-node's Engine.IO engine: frames written in place, slow clients cut off, one
greenlet per websocket connection, pings from one greenlet. Real sockets throughout."""

import gc
import json
import socket
import struct
import time

import greenlet
import pytest
import websocket
from engineio import packet as eio_packet
from gevent import socket as gsocket

from siocluster import App, IoNode
from siocluster.transport import (
    FrameWriter,
    corked,
    event_packet,
    message_frame,
    websocket_frame,
)
from tests.helpers import EventClient, wait_until


def parse_frame(frame: bytes):
    """RFC 6455 by hand: (opcode, payload) of one unmasked, final frame."""
    first, second = frame[0], frame[1]
    assert first & 0x80, "FIN must be set"
    assert not second & 0x80, "server frames are not masked"
    size, offset = second & 0x7F, 2
    if size == 126:
        size, offset = struct.unpack("!H", frame[2:4])[0], 4
    elif size == 127:
        size, offset = struct.unpack("!Q", frame[2:10])[0], 10
    payload = frame[offset:]
    assert len(payload) == size
    return first & 0x0F, payload


@pytest.mark.parametrize("size", [0, 124, 125, 65534, 65535, 70000])
def test_text_frames_of_every_length_encoding(size):
    pkt = eio_packet.Packet(eio_packet.MESSAGE, "é" * (size // 2) + "x" * (size % 2))
    frame = websocket_frame(pkt)
    opcode, payload = parse_frame(frame)
    assert opcode == 0x1
    assert payload.decode("utf-8") == pkt.encode()
    # encoded once: every recipient of a broadcast gets the very same bytes
    assert websocket_frame(pkt) is frame
    # and the frame of a message's text alone is the same, byte for byte
    assert message_frame(pkt.data) == frame


def test_binary_frame():
    pkt = eio_packet.Packet(eio_packet.MESSAGE, b"\x00\xff\x10")
    assert parse_frame(websocket_frame(pkt)) == (0x2, b"\x00\xff\x10")


def read_exactly(sock, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(min(65536, count - len(data)))
        assert chunk, f"stream ended after {len(data)} of {count} bytes"
        data += chunk
    return bytes(data)


def test_writer_never_blocks_and_keeps_order():
    ours, peer = gsocket.socketpair()
    with ours, peer:
        writer = FrameWriter(ours, ours._sock, limit=64 << 20)
        chunks = [bytes([n]) * 65536 for n in range(128)]      # 8 MB: more than the kernel takes
        for chunk in chunks:
            # the peer reads nothing yet, and no other greenlet runs: a write that waited
            # for the peer would never return (gevent would report a loop that blocks forever)
            writer.write(chunk)
        assert writer.waiting > 0, "the kernel took 8 MB at once: the backlog was not used"
        assert read_exactly(peer, len(chunks) * 65536) == b"".join(chunks)
        wait_until(lambda: writer.waiting == 0, message="backlog drained")
        writer.write(b"after")
        assert read_exactly(peer, 5) == b"after"


def test_writer_cuts_off_a_client_past_its_limit():
    ours, peer = gsocket.socketpair()
    with ours, peer:
        cut = []
        writer = FrameWriter(ours, ours._sock, limit=1 << 20, on_overflow=cut.append)
        written = 0
        for _ in range(1000):
            if cut:
                break
            writer.write(b"x" * 65536)
            written += 65536
        assert cut and cut[0] > 1 << 20 and writer.broken
        writer.write(b"ignored")                 # a cut-off client takes nothing more
        received = 0
        while True:
            chunk = peer.recv(65536)
            if not chunk:
                break                            # the end of the stream: it was shut down
            received += len(chunk)
        # the backlog was dropped: the client got what the kernel had taken, no more
        assert 0 < received < written


def sends(sock, calls):
    """Count the system calls a writer makes on ``sock`` (its real, non-blocking socket)."""
    class Counting:
        def send(self, data):
            calls.append(bytes(data))
            return sock.send(data)
    return Counting()


def test_a_corked_block_writes_each_connection_once_in_order():
    import gevent

    (ours1, peer1), (ours2, peer2) = gsocket.socketpair(), gsocket.socketpair()
    with ours1, peer1, ours2, peer2:
        calls1, calls2 = [], []
        one = FrameWriter(ours1, sends(ours1._sock, calls1), limit=1 << 20)
        two = FrameWriter(ours2, sends(ours2._sock, calls2), limit=1 << 20)
        with corked():
            one.write(b"a")
            two.write(b"x")
            one.write(b"b")
            # another greenlet: to a connection holding frames it queues behind them; to
            # one holding none it goes out at once
            gevent.spawn(one.write, b"c").join()
            three_calls = []
            three = FrameWriter(ours2, sends(ours2._sock, three_calls), limit=1 << 20)
            gevent.spawn(three.write, b"now").join()
            assert three_calls == [b"now"]
            with corked():               # nested: the outer block still holds
                one.write(b"d")
            assert calls1 == [] and calls2 == []
        assert calls1 == [b"abcd"] and calls2 == [b"x"]
        assert read_exactly(peer1, 4) == b"abcd"
        assert read_exactly(peer2, 4) == b"now" + b"x"
        one.write(b"e")                  # after the block: at once
        assert calls1 == [b"abcd", b"e"]


def test_a_corked_block_drops_the_frames_of_a_connection_cut_meanwhile():
    ours, peer = gsocket.socketpair()
    with ours, peer:
        calls = []
        writer = FrameWriter(ours, sends(ours._sock, calls), limit=1 << 20)
        with corked():
            writer.write(b"held")
            writer.finish(timeout=0.1)      # its reader ended: it writes nothing more
        assert calls == []


@pytest.mark.parametrize("text", [
    '42["say",{"text":"hi"}]', '4212["say",1,2]', '42/chat,["say"]', '42/chat,7["say",[1]]',
    '42["a-b",{"x":"1-2"}]', '420["e"]', '42/,3["e",null]', '42["é", "ü"]',
])
def test_a_clients_event_is_read_as_python_socketio_reads_it(text):
    from socketio.packet import Packet

    from siocluster.envelope import JSON

    packet = Packet(encoded_packet=text[1:])
    assert event_packet(text, JSON.loads) == (packet.namespace or "/", packet.id, packet.data)


@pytest.mark.parametrize("text", [
    '42["say"', '42{"a":1}', '42[]', '42"text"', '42/chat?x=1,["e"]', '421-["e"]', '43["e"]',
    '452-["e",{"_placeholder":true,"num":0}]', '42' + "1" * 100 + '["e"]', '42/chat',
    '4',
])
def test_other_forms_are_left_to_python_socketio(text):
    from siocluster.envelope import JSON

    assert event_packet(text, JSON.loads) is None


# ---- on a running io-node ---------------------------------------------------------------------

def flood_app(disconnects):
    app = App()

    @app.on("join")
    def join(sid, room):
        app.enter_room(sid, room)
        return True

    @app.on("flood")
    def flood(sid, data):
        for n in range(data["count"]):
            app.emit("big", {"n": data["first"] + n, "pad": "x" * data["size"]}, to=data["room"])
        return True

    @app.event
    def disconnect(sid, reason):
        disconnects.append(sid)

    return app


class RawClient:
    """A Socket.IO client on a plain websocket: it reads only when told to, and runs no
    greenlet of its own."""

    def __init__(self, io_node, receive_buffer=None):
        port = io_node.address[1]
        options = [(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)] \
            if receive_buffer else []
        self.ws = websocket.create_connection(
            f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket", timeout=10,
            sockopt=options)
        # closed here whatever websocket-client does with it on its error paths
        self.sock = self.ws.sock
        opened = self.ws.recv()
        assert opened.startswith("0"), opened
        self.open = json.loads(opened[1:])

    def connect(self) -> str:
        self.ws.send("40")
        reply = self.next_packet()
        assert reply.startswith("40"), reply
        return json.loads(reply[2:])["sid"]

    def next_packet(self) -> str:
        while True:
            data = self.ws.recv()
            if data != "2":
                return data
            self.ws.send("3")              # pong

    def emit(self, event, data, ack_id=None) -> None:
        self.ws.send(f"42{'' if ack_id is None else ack_id}{json.dumps([event, data])}")

    def close(self):
        try:
            self.ws.close(timeout=1)
        except Exception:
            pass         # the server ended the connection first
        finally:
            self.ws.shutdown()
            self.sock.close()


def test_slow_client_is_cut_off_and_the_others_get_everything(cluster, caplog):
    disconnects = []
    cluster.app_node(flood_app(disconnects))
    node = cluster.io_node(max_send_backlog=256 * 1024)
    fast = cluster.client(node)
    assert fast.call("join", "room") == [True]
    # a client that stops reading, with a small receive buffer so its backlog builds soon
    slow = RawClient(node, receive_buffer=4096)
    slow_sid = slow.connect()
    slow.emit("join", "room", ack_id=1)
    assert slow.next_packet() == "431[true]"
    sent, rounds = 0, 0
    while slow_sid not in disconnects:
        rounds += 1
        assert rounds <= 40, "the slow client was never cut off"
        assert fast.call("flood", {"room": "room", "first": sent, "count": 20,
                                   "size": 16 * 1024}, timeout=10) == [True]
        sent += 20
        fast.expect("big", sent, timeout=10)
    # the fast client got every message, in order, while the slow one was cut off
    assert [args[0]["n"] for args in fast.received("big")] == list(range(sent))
    assert "client too slow" in caplog.text
    assert node.sio.eio.slow_clients_cut == 1                 # siocluster_slow_clients_cut_total
    assert node.sio.manager.is_connected(fast.sid, "/")
    assert not node.sio.manager.is_connected(slow_sid, "/")
    slow.close()


def test_events_skip_python_socketios_packets_and_other_forms_take_its_way(cluster):
    cluster.app_node(flood_app([]))
    node = cluster.io_node()
    handlers, taken = node.sio.eio.handlers, []
    original = handlers["message"]
    handlers["message"] = lambda eio_sid, data: (taken.append(data), original(eio_sid, data))
    client = RawClient(node)
    try:
        client.connect()
        client.emit("join", "room", ack_id=1)
        assert client.next_packet() == "431[true]"
        client.emit("join", "room")
        client.emit("join", "other", ack_id=2)
        assert client.next_packet() == "432[true]"
        assert taken == ["0"]           # the CONNECT only: the events took the short way
        # not JSON: python-socketio's reading refuses it (engineio logs that), as before
        client.ws.send('42["join"')
        client.emit("join", "room", ack_id=3)
        assert client.next_packet() == "433[true]"
        assert taken == ["0", '2["join"']
    finally:
        client.close()


def live_greenlets() -> int:
    return sum(1 for obj in gc.get_objects()
               if isinstance(obj, greenlet.greenlet) and not obj.dead)


def test_one_greenlet_per_websocket_connection(cluster):
    cluster.app_node(flood_app([]))
    node = cluster.io_node()
    RawClient(node).close()                    # the engine's own tasks start with a first
    before = live_greenlets()
    clients = [RawClient(node) for _ in range(30)]
    try:
        for client in clients:
            client.connect()
        # engineio's own websocket handling keeps three per connection
        assert live_greenlets() - before <= len(clients) + 2
        assert len(node.sio.eio.pinger.due) >= len(clients)
    finally:
        for client in clients:
            client.close()


def test_pings_come_from_one_greenlet_and_the_silent_are_cut_off(cluster):
    cluster.app_node(flood_app([]))
    node = IoNode(cluster.config, ping_interval=1, ping_timeout=1)
    node.start()
    node.start_server(("127.0.0.1", 0))
    cluster.io_nodes.append(node)
    answering = cluster.client(node)
    # a client gone without a word: after its connect it neither reads nor answers
    silent = RawClient(node)
    assert silent.open["pingInterval"] == 1000
    silent.connect()
    address = silent.ws.sock.getsockname()
    started = time.monotonic()
    assert address in node._server.clients
    # its connection is ended, reader greenlet and all, though it never answered the close
    wait_until(lambda: address not in node._server.clients, timeout=10,
               message="the silent client's connection was kept")
    assert 1.5 < time.monotonic() - started < 8
    # what it was sent meanwhile: a ping, the close packet, then the close frame or the end
    # of the stream (websocket-client reports one or the other, by the timing of its reads)
    frames = []
    try:
        while len(frames) < 5:
            opcode, data = silent.ws.recv_data(control_frame=True)
            frames.append((opcode, data))
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                break
    except websocket.WebSocketConnectionClosedException:
        pass
    text = websocket.ABNF.OPCODE_TEXT
    assert frames[:2] == [(text, b"2"), (text, b"1")], frames
    assert len(frames) == 2 or frames[2][0] == websocket.ABNF.OPCODE_CLOSE, frames
    # the client that answers its pings is still there, and still served
    assert answering.sio.connected
    assert answering.call("join", "r") == [True]
    silent.close()


@pytest.mark.parametrize("size", [10, 300, 100_000])
def test_upgrade_from_polling_then_broadcasts_of_every_frame_size(cluster, size):
    cluster.app_node(flood_app([]))
    node = cluster.io_node()
    client = EventClient()
    cluster.clients.append(client)
    client.sio.connect(f"http://127.0.0.1:{node.address[1]}",
                       transports=["polling", "websocket"], wait_timeout=5)
    wait_until(lambda: client.sio.transport() == "websocket", message="upgraded")
    socket_ = node.sio.eio.sockets[client.sio.eio.sid]
    wait_until(lambda: socket_.writer is not None, message="writing frames itself")
    assert client.call("join", "room") == [True]
    assert client.call("flood", {"room": "room", "first": 0, "count": 3, "size": size}) == [True]
    got = client.expect("big", 3)
    assert [(m[0]["n"], len(m[0]["pad"])) for m in got] == [(0, size), (1, size), (2, size)]


def test_a_plain_socketio_server_still_works(cluster):
    """An application's own ``socketio.Server`` (the seed's makeIoServer) keeps engineio's
    connections, and the io-node works the same on it."""
    import socketio

    cluster.app_node(flood_app([]))
    node = IoNode(cluster.config, sio=socketio.Server(async_mode="gevent"))
    node.start()
    node.start_server(("127.0.0.1", 0))
    cluster.io_nodes.append(node)
    client = cluster.client(node)
    assert client.call("join", "room") == [True]
    assert client.call("flood", {"room": "room", "first": 0, "count": 2, "size": 10}) == [True]
    assert len(client.expect("big", 2)) == 2


# ---- the private names of dependencies engine.py relies on ---------------------------------

def test_dependencies_are_the_versions_engine_py_was_written_against():
    from importlib.metadata import version

    from siocluster.engine import TESTED_WITH

    for package, tested in TESTED_WITH.items():
        installed = version(package)
        assert installed.split(".")[:2] == tested.split("."), (
            f"{package} {installed} is installed; siocluster/engine.py reaches into its "
            f"private names as of {tested}.x: check them, then TESTED_WITH and setup.cfg")


def test_every_private_name_engine_py_relies_on_is_there():
    import inspect

    import engineio
    import socketio
    from engineio.socket import Socket
    from gevent import socket as gsocket
    from geventwebsocket.handler import WebSocketHandler
    from geventwebsocket.websocket import Header, WebSocket

    relied_on = {
        Socket: ["_websocket_handler", "send", "close", "schedule_ping", "receive",
                 "handle_get_request", "poll", "check_ping_timeout"],
        engineio.Server: ["_handle_connect", "_trigger_event", "_upgrades", "_unauthorized",
                          "_ok", "_bad_request", "_generate_sid_cookie", "_service_task",
                          "_cors_allowed_origins", "generate_id", "start_background_task"],
        socketio.Server: ["_engineio_server_class", "_handle_event_internal", "_send_packet",
                          "_handle_eio_message"],
        socketio.Namespace: ["_set_server", "trigger_event"],
        Header: ["unmask_payload"],
        WebSocket: ["raw_write", "raw_read", "send_frame", "OPCODE_CLOSE", "closed", "close"],
    }
    missing = [f"{owner.__module__}.{owner.__name__}.{name}"
               for owner, names in relied_on.items() for name in names
               if not hasattr(owner, name)]
    assert missing == []
    assert hasattr(eio_packet.Packet(eio_packet.MESSAGE, b"x"), "binary")
    # an attachment being waited for, per connection (`IoSocketServer._fast_event`)
    assert isinstance(socketio.Server()._binary_packet, dict)
    # the overridden and called ones keep the signatures engine.py was written for
    assert list(inspect.signature(engineio.Server._handle_connect).parameters) == [
        "self", "environ", "start_response", "transport", "jsonp_index"]
    assert list(inspect.signature(socketio.Server._handle_event_internal).parameters) == [
        "self", "server", "sid", "eio_sid", "data", "namespace", "id"]
    assert list(inspect.signature(Socket.close).parameters) == [
        "self", "wait", "abort", "reason"]
    # gevent's socket keeps the real one under it; gevent-websocket calls the server's hook
    with gsocket.socket() as sock:
        assert hasattr(sock._sock, "send")
    assert "pre_start_hook" in inspect.getsource(WebSocketHandler.run_application)
