"""io-nodes and app-nodes talking through a real Redis, with real Socket.IO clients."""

import shutil
import uuid

import pytest

from siocluster import App, Config
from tests.conftest import Cluster, RedisServer
from tests.helpers import wait_until

TRANSPORTS = ["websocket", "polling"]


def chat_app(log=None):
    """A small app: rooms by name, broadcasts, and a few ways to misbehave."""
    app = App()
    log = log if log is not None else []

    @app.on("echo")
    def echo(sid, data):
        log.append((app._node().id, data))
        app.emit("echoed", data, to=sid)
        return {"echo": data}

    @app.on("join")
    def join(sid, room):
        app.enter_room(sid, room)
        return "joined"

    @app.on("leave")
    def leave(sid, room):
        app.leave_room(sid, room)
        return "left"

    @app.on("shout")
    def shout(sid, data):
        app.emit("shouted", data, to=data["room"],
                 skip_sid=sid if data.get("skip_me") else None)
        # a marker to everyone after the broadcast: whoever has it would have had the shout
        app.emit("done", data["text"])

    @app.on("put")
    def put(sid, sid_to_move, room, join):
        if join:
            app.enter_room(sid_to_move, room)
        else:
            app.leave_room(sid_to_move, room)
        return app.room_members(room)

    @app.on("kick")
    def kick(sid, other):
        app.disconnect(other)
        return True

    @app.on("boom")
    def boom(sid, data):
        raise RuntimeError("handler bug")

    return app, log


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_event_reaches_one_app_node_and_reply_reaches_sender(cluster, transport):
    app, log = chat_app()
    io = cluster.io_node()
    cluster.app_node(app)
    cluster.app_node(app)
    client = cluster.client(io, transport=transport)

    assert client.call("echo", "hello") == [{"echo": "hello"}]
    assert client.expect("echoed") == [["hello"]]
    assert [data for _, data in log] == ["hello"]     # handled exactly once


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_room_broadcast_reaches_members_on_both_io_nodes_and_nobody_else(cluster, transport):
    app, _ = chat_app()
    io1, io2 = cluster.io_node(), cluster.io_node()
    cluster.app_node(app)
    cluster.app_node(app)
    a = cluster.client(io1, transport=transport)
    b = cluster.client(io2, transport=transport)
    outsider = cluster.client(io2, transport=transport)
    other_room = cluster.client(io1, transport=transport)
    assert a.call("join", "lobby") == ["joined"]
    assert b.call("join", "lobby") == ["joined"]
    assert other_room.call("join", "kitchen") == ["joined"]

    a.call("shout", {"room": "lobby", "text": "hi all"})
    for client in (a, b, outsider, other_room):
        client.expect("done")
    assert a.received("shouted") == [[{"room": "lobby", "text": "hi all"}]]
    assert b.received("shouted") == [[{"room": "lobby", "text": "hi all"}]]
    assert outsider.received("shouted") == []
    assert other_room.received("shouted") == []


def test_skip_sid(cluster):
    app, _ = chat_app()
    io1, io2 = cluster.io_node(), cluster.io_node()
    cluster.app_node(app)
    a, b = cluster.client(io1), cluster.client(io2)
    a.call("join", "r")
    b.call("join", "r")
    a.call("shout", {"room": "r", "text": "not me", "skip_me": True})
    a.expect("done")
    b.expect("done")
    assert a.received("shouted") == []
    assert b.received("shouted") == [[{"room": "r", "text": "not me", "skip_me": True}]]


def test_one_room_of_websocket_and_polling_clients_gets_every_emit_once_in_order(cluster):
    """An emit's frame is written straight to websocket clients and goes python-socketio's
    way to polling ones (`engine.emit`): each member gets each emit once and in order,
    skip and binary data included."""
    app, _ = chat_app()
    io = cluster.io_node()
    cluster.app_node(app)
    ws, polling, ws2 = (cluster.client(io), cluster.client(io, transport="polling"),
                        cluster.client(io))
    for client in (ws, polling, ws2):
        assert client.call("join", "mixed") == ["joined"]
    ws.call("shout", {"room": "mixed", "text": "one"})
    ws.call("shout", {"room": "mixed", "text": "two", "skip_me": True})
    polling.call("shout", {"room": "mixed", "text": b"\x00three"})
    for client in (ws, polling, ws2):
        client.expect("done", count=3)
    texts = {name: [args[0]["text"] for args in client.received("shouted")]
             for name, client in (("ws", ws), ("polling", polling), ("ws2", ws2))}
    assert texts == {"ws": ["one", b"\x00three"], "polling": ["one", "two", b"\x00three"],
                     "ws2": ["one", "two", b"\x00three"]}


def test_join_leave_and_disconnect_across_io_nodes(cluster):
    app, _ = chat_app()
    io1, io2 = cluster.io_node(), cluster.io_node()
    cluster.app_node(app)
    a, b = cluster.client(io1), cluster.client(io2)

    # a (on io1) puts b (on io2) into a room: the command crosses io-nodes
    assert a.call("put", b.sid, "side", True) == [[b.sid]]
    a.call("shout", {"room": "side", "text": "one"})
    b.expect("done")
    assert b.received("shouted") == [[{"room": "side", "text": "one"}]]

    assert a.call("put", b.sid, "side", False) == [[]]
    a.call("shout", {"room": "side", "text": "two"})
    b.expect("done", count=2)
    assert b.received("shouted") == [[{"room": "side", "text": "one"}]]

    disconnected = []
    b.sio.on("disconnect", lambda *reason: disconnected.append(reason))
    assert a.call("kick", b.sid) == [True]
    wait_until(lambda: disconnected, message="b was not disconnected")
    assert a.sio.connected


def test_messages_are_spread_over_app_nodes(cluster):
    app, log = chat_app()
    io = cluster.io_node()
    n1, n2 = cluster.app_node(app), cluster.app_node(app)
    clients = [cluster.client(io) for _ in range(4)]
    for i in range(40):
        clients[i % 4].call("echo", i)
    handled_by = {node_id for node_id, _ in log}
    assert sorted(data for _, data in log) == list(range(40))   # each exactly once
    assert handled_by == {n1.id, n2.id}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_binary_payloads_round_trip(cluster, transport):
    app, _ = chat_app()
    io = cluster.io_node()
    cluster.app_node(app)
    client = cluster.client(io, transport=transport)
    blob = bytes(range(256)) * 4
    data = {"name": "file", "parts": [blob, b"", b"\x00\xff"]}
    assert client.call("echo", data) == [{"echo": data}]
    assert client.expect("echoed") == [[data]]


def test_handler_exception_does_not_stop_the_node(cluster):
    app, _ = chat_app()
    io = cluster.io_node()
    node = cluster.app_node(app, max_attempts=2)
    client = cluster.client(io)
    client.sio.emit("boom", {"x": 1})
    wait_until(lambda: cluster.config.redis_client().llen(node.keys.dead) == 1,
               message="the failing message did not reach the dead-letter list")
    assert client.call("echo", "still here") == [{"echo": "still here"}]
    assert all(not g.dead for g in node._greenlets)


def test_namespaces_and_catch_all(cluster):
    app = App()
    seen = []

    @app.on("*", namespace="/chat")
    def any_chat_event(event, sid, *args):
        seen.append((event, args))
        return event

    @app.on("ping")
    def ping(sid):
        return "pong"

    io = cluster.io_node()
    cluster.app_node(app)
    client = cluster.client(io, namespaces=["/", "/chat"])
    assert client.call("whatever", 1, 2, namespace="/chat") == ["whatever"]
    assert client.call("ping") == ["pong"]
    assert seen == [("whatever", (1, 2))]


def test_app_node_started_after_clients_connected(cluster):
    app, log = chat_app()
    io = cluster.io_node(connect_timeout=0.5, connect_timeout_accept=True)
    client = cluster.client(io)             # no app-node yet: the connect is let in on timeout
    client.sio.emit("echo", "early")        # waits in the inbox
    cluster.app_node(app)
    client.expect("echoed")
    assert client.call("echo", "later") == [{"echo": "later"}]
    assert [data for _, data in log] == ["early", "later"]


def test_stopped_app_node_share_goes_to_the_others(cluster):
    app, log = chat_app()
    io = cluster.io_node()
    first = cluster.app_node(app)
    second = cluster.app_node(app)
    client = cluster.client(io)
    first.stop()
    for i in range(10):
        assert client.call("echo", i) == [{"echo": i}]
    assert {node_id for node_id, _ in log} == {second.id}


def test_clients_of_a_stopped_io_node_connect_to_another(cluster):
    app, _ = chat_app()
    io1, io2 = cluster.io_node(), cluster.io_node()
    cluster.app_node(app)
    client = cluster.client(io1)
    assert client.call("echo", 1) == [{"echo": 1}]
    io1.stop()
    wait_until(lambda: not client.sio.connected, message="client still connected to io1")
    client.close()
    client.sio.connect(f"http://127.0.0.1:{io2.address[1]}", transports=["websocket"],
                       wait_timeout=5)
    assert client.call("echo", 2) == [{"echo": 2}]


def test_a_cluster_over_a_unix_socket():
    """``unix://`` Redis URLs (a Redis on the same machine): the nodes' options for TCP
    connections (keepalive) are not given to a unix socket's."""
    server = RedisServer()
    server.extra_args += ["--unixsocket", f"{server.dir}/redis.sock", "--unixsocketperm", "700"]
    server.start()
    config = Config(redis_url=f"unix://{server.dir}/redis.sock?db=0",
                    prefix=f"test-{uuid.uuid4().hex[:8]}", pop_timeout=0.2,
                    heartbeat_interval=0.3, node_ttl=1.5, rate_limit=0)
    cluster = Cluster(config)
    try:
        app, log = chat_app()
        io = cluster.io_node()
        cluster.app_node(app)
        client = cluster.client(io)
        assert client.call("echo", "over a unix socket") == [{"echo": "over a unix socket"}]
        assert client.expect("echoed") == [["over a unix socket"]]
        assert io.redis.connection_pool.connection_kwargs["path"].endswith("redis.sock")
    finally:
        cluster.stop()
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)
