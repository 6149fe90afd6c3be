"""What one client may make an io-node hold, each bound forced through real sockets: packets
queued for a polling client, a websocket message being read, the attachments a message
announces, connections (in all, per address), a request's headers, an upgrade's probe, and
the policy server's clients."""

import json
import logging
import socket
import struct

import gevent
import gevent.event
import requests
import websocket

from siocluster import App, Config, IoNode, PolicyServer
from siocluster.listener import FULL, TOO_MANY
from tests.helpers import wait_until
from tests.test_hardening import RawClient

RECORD_SEPARATOR = "\x1e"      # between the packets of one polling request or answer
MASK = b"\x01\x02\x03\x04"     # of a frame sent by hand, as a client's must be masked


def flood_app(log):
    """An app that sends a client as many messages as it asks for, and logs who leaves."""
    app = App()

    @app.event
    def disconnect(sid, reason):
        log.append(("disconnect", sid))

    @app.on("flood")
    def flood(sid, count, size):
        for n in range(count):
            app.emit("big", {"n": n, "data": "x" * size}, to=sid)
        return True

    @app.on("echo")
    def echo(sid, *args):
        return {"got": len(args)}

    return app


class RawPolling:
    """Engine.IO long-polling by hand: a client that may stop coming for its packets."""

    def __init__(self, io):
        self.url = f"http://127.0.0.1:{io.address[1]}/socket.io/"
        opened = requests.get(self.url, params={"EIO": "4", "transport": "polling"}, timeout=5)
        self.sid = json.loads(opened.text[1:])["sid"]
        self.params = {"EIO": "4", "transport": "polling", "sid": self.sid}

    def post(self, *packets):
        return requests.post(self.url, params=self.params, data=RECORD_SEPARATOR.join(packets),
                             timeout=10)

    def get(self):
        answer = requests.get(self.url, params=self.params, timeout=10)
        return answer.status_code, answer.text.split(RECORD_SEPARATOR)

    def connect(self):
        """Connect to the default namespace; returns the Socket.IO sid."""
        assert self.post("40").status_code == 200     # answered once the app let it in
        status, packets = self.get()
        assert status == 200 and packets[0].startswith("40{"), packets
        return json.loads(packets[0][2:])["sid"]


# ---- polling: packets waiting, a client that stopped asking --------------------------------

def test_a_polling_client_that_never_comes_for_its_packets_is_cut_off_at_the_bound(
        cluster, caplog):
    log = []
    io = cluster.io_node(max_send_backlog=64 << 10)
    cluster.app_node(flood_app(log))
    raw = RawPolling(io)
    sid = raw.connect()
    with caplog.at_level(logging.WARNING, logger="siocluster.io-node"):
        # 40 messages of 4 KB for it, and it never asks for one
        assert raw.post('42["flood",40,4000]').status_code == 200
        wait_until(lambda: ("disconnect", sid) in log, timeout=10,
                   message="the client kept growing its queue")
    assert "client too slow" in caplog.text and "max_send_backlog is 65536" in caplog.text
    assert raw.get()[0] == 400              # its session is gone
    assert io.clients == {}


def test_a_polling_client_that_sends_pongs_but_never_polls_is_timed_out(cluster, caplog):
    log = []
    # recovery off: the app hears the disconnect at once, not when the window closes
    io = IoNode(cluster.config.replace(recovery_window=0), ping_interval=0.2,
                ping_timeout=0.5)
    cluster.io_nodes.append(io)
    io.start()
    io.start_server(("127.0.0.1", 0))
    cluster.app_node(flood_app(log))
    raw = RawPolling(io)
    sid = raw.connect()
    stop = gevent.event.Event()

    def pong_unasked():
        # pongs keep engineio's own ping check content, whether or not pings were read
        while not stop.wait(0.1):
            raw.post("3")

    ponger = gevent.spawn(pong_unasked)
    try:
        with caplog.at_level(logging.INFO, logger="siocluster.io-node"):
            wait_until(lambda: ("disconnect", sid) in log, timeout=10,
                       message="a client that never polls was kept")
    finally:
        stop.set()
        ponger.join(5)
    assert "no request for its packets in 0.5s" in caplog.text


# ---- websocket messages: size as they are read, attachments announced ----------------------

def done(raw):
    """Close a raw client's websocket, and its socket even when the server closed first."""
    raw.close()
    raw.ws.shutdown()


def close_code(ws):
    """The code of the close frame the server sends next (pings and packets skipped)."""
    while True:
        opcode, frame = ws.recv_data_frame(True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return struct.unpack("!H", frame.data[:2])[0]


def test_a_fragmented_message_is_cut_at_the_cap_as_it_is_read(cluster, caplog):
    io = cluster.io_node(max_message_size=10_000)     # Engine.IO's cap: 2 x that + 64 KiB
    raw = RawClient(io)
    chunk = "x" * 16_384
    with caplog.at_level(logging.WARNING, logger="siocluster.io-node"):
        raw.ws.send_frame(websocket.ABNF.create_frame('42["echo","', websocket.ABNF.OPCODE_TEXT,
                                                      fin=0))
        for _ in range(5):                              # 80 KiB, still below the cap
            raw.ws.send_frame(websocket.ABNF.create_frame(chunk, websocket.ABNF.OPCODE_CONT,
                                                          fin=0))
        # one more fragment announced, past the cap: none of its bytes may be waited for
        raw.ws.sock.sendall(struct.pack("!BBH", 0x00, 0x80 | 126, len(chunk)) + MASK)
        assert close_code(raw.ws) == 1009
    assert "websocket message of more than 85536 bytes" in caplog.text
    done(raw)


def test_a_frame_announcing_a_huge_payload_is_refused_before_any_of_it_is_read(cluster):
    io = cluster.io_node()
    raw = RawClient(io)
    # a final text frame of 1 TB, masked as a client's must be; its payload never comes
    raw.ws.sock.sendall(struct.pack("!BBQ", 0x81, 0x80 | 127, 1 << 40) + MASK)
    assert close_code(raw.ws) == 1009
    done(raw)


def test_a_message_announcing_too_many_attachments_cuts_the_client_off(cluster, caplog):
    log = []
    io = cluster.io_node(max_attachments=2)
    cluster.app_node(flood_app(log))
    # within the bound, a binary event is read whole and answered
    within = RawClient(io)
    assert within.connect().startswith("40")
    within.ws.send('452-0["echo",{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]')
    within.ws.send_binary(b"\x00\x01")
    within.ws.send_binary(b"\x02")
    assert within.next_packet().startswith("430")          # the ack of event 0
    raw = RawClient(io)
    sid = json.loads(raw.connect()[2:])["sid"]
    with caplog.at_level(logging.WARNING, logger="siocluster.io-node"):
        raw.ws.send('451000000-["upload",{"_placeholder":true,"num":0}]')
        wait_until(lambda: ("disconnect", sid) in log, message="the client was kept")
    assert "a message announcing 1000000 attachments (max_attachments is 2)" in caplog.text
    assert 'it began 51000000-["upload"' in caplog.text     # what it sent, cut short
    assert within.ws.connected and raw.next_packet() == "1"  # Engine.IO's close
    done(within)
    done(raw)


# ---- connections: in all, per address, a request's headers, an upgrade's probe -------------

def handshake_status(io, source="127.0.0.1"):
    """The status of an Engine.IO handshake sent from ``source`` (a loopback address)."""
    with socket.create_connection(io.address[:2], timeout=5,
                                  source_address=(source, 0)) as sock:
        sock.sendall(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\n"
                     b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, answer.partition(b"\r\n\r\n")[2].decode()


def hold(io, count, source="127.0.0.1"):
    """Open ``count`` connections that send nothing; returns them."""
    return [socket.create_connection(io.address[:2], timeout=5, source_address=(source, 0))
            for _ in range(count)]


def test_connections_past_the_cap_are_refused_until_some_close(cluster):
    io = cluster.io_node(max_connections=3)
    held = hold(io, 3)
    try:
        wait_until(lambda: io._server.connections == 3, message="connections not counted")
        assert handshake_status(io) == (503, FULL)
        held.pop().close()
        wait_until(lambda: io._server.connections == 2, message="a closed one still counted")
        assert handshake_status(io)[0] == 200
    finally:
        for sock in held:
            sock.close()


def test_refused_connections_answered_at_once_are_bounded_too(cluster, monkeypatch):
    from siocluster import listener

    monkeypatch.setattr(listener, "REFUSALS_AT_ONCE", 2)
    io = cluster.io_node(max_connections=1)
    held = hold(io, 1)
    try:
        wait_until(lambda: io._server.connections == 1, message="connection not counted")
        # refused clients that never read their answer: two are answered (and wait for the
        # client for a moment), the others closed at once, so a flood holds no more
        refused = hold(io, 6)
        answers = []
        for sock in refused:
            answers.append(sock.recv(4096))
            assert len(io._server.refusals) <= 2
        assert sum(1 for answer in answers if answer.startswith(b"HTTP/1.1 503")) == 2
        assert answers.count(b"") == 4
        for sock in refused:
            sock.close()
    finally:
        for sock in held:
            sock.close()


def test_one_address_is_capped_and_its_refusals_logged_once(cluster, caplog):
    io = cluster.io_node(max_connections_per_address=2)
    held = hold(io, 2)
    try:
        wait_until(lambda: io._server.connections == 2, message="connections not counted")
        with caplog.at_level(logging.WARNING, logger="siocluster.io-node"):
            for _ in range(3):
                assert handshake_status(io) == (503, TOO_MANY)
        assert handshake_status(io, source="127.0.0.2")[0] == 200   # another address
    finally:
        for sock in held:
            sock.close()
    refusals = [r for r in caplog.records if "refused a connection" in r.getMessage()]
    assert len(refusals) == 1 and "from 127.0.0.1" in refusals[0].getMessage()
    wait_until(lambda: io._server.connections == 0, message="connections not released")
    assert handshake_status(io)[0] == 200


def closed_by_server(sock) -> bool:
    """Read until the server closes the connection (True), or 5 s pass (False)."""
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except socket.timeout:
        return False
    return True


def test_the_io_node_sends_each_write_at_once(cluster):
    # Nagle's algorithm would hold a frame while the client has not acknowledged the last,
    # up to its delayed acknowledgement (40 ms on Linux): the p99 latency of a busy chat
    io = cluster.io_node()
    cluster.app_node(flood_app([]))
    client = RawClient(io)
    assert client.connect().startswith("40")
    [sock] = io.sio.eio.sockets.values()
    assert sock.writer._raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    done(client)


def test_a_client_dribbling_its_headers_is_closed_after_the_handshake_timeout(cluster):
    io = cluster.io_node(handshake_timeout=0.5)
    cluster.app_node(flood_app([]))
    # a connection of before, open longer than that: the deadline is the request's only
    steady = RawClient(io)
    assert steady.connect().startswith("40")
    slow = socket.create_connection(io.address[:2], timeout=5)
    stop = gevent.event.Event()

    def dribble():
        slow.sendall(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\n")
        try:
            while not stop.wait(0.05):
                slow.sendall(b"X")          # one byte of a header at a time, forever
        except OSError:
            pass

    dribbler = gevent.spawn(dribble)
    try:
        assert closed_by_server(slow), "the slow client was kept"
    finally:
        stop.set()
        dribbler.join(5)
        slow.close()
    steady.ws.send('420["echo"]')
    assert steady.next_packet() == '430[{"got":0}]'
    done(steady)


def test_an_upgrade_whose_probe_never_comes_is_closed_after_the_handshake_timeout(cluster):
    io = cluster.io_node(handshake_timeout=0.5)
    raw = RawPolling(io)
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{io.address[1]}/socket.io/?EIO=4&transport=websocket&sid={raw.sid}",
        timeout=5)
    try:
        assert closed_by_server(ws.sock), "the silent upgrade was kept"
    finally:
        ws.close()


# ---- the policy server -------------------------------------------------------------------

def test_the_policy_server_answers_as_many_clients_at_once_as_its_pool_holds():
    events = []

    class Recording(PolicyServer):
        def handle(self, sock, address):
            events.append(("start", address[1]))
            try:
                super().handle(sock, address)
            finally:
                events.append(("end", address[1]))

    server = Recording(("127.0.0.1", 0), ports=[8081], config=Config(policy_max_connections=2),
                       timeout=10)
    server.start()
    try:
        first, second = (socket.create_connection(server.address[:2], timeout=5)
                         for _ in range(2))
        wait_until(lambda: len(events) == 2, message="the first two were not taken")
        assert server.full()
        third = socket.create_connection(server.address[:2], timeout=5)
        third.sendall(b"<policy-file-request/>\0")
        answer = gevent.spawn(closed_and_read, third)
        first_port, third_port = first.getsockname()[1], third.getsockname()[1]
        first.close()                   # its slot frees: the third is taken
        assert answer.get(timeout=5).startswith(b"<cross-domain-policy>")
        assert events.index(("end", first_port)) < events.index(("start", third_port)), events
        second.close()
        third.close()
    finally:
        server.stop(timeout=1)


def closed_and_read(sock) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data

