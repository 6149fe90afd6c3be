"""The seed's API in Python names: shortcuts, io-node events, and Messages both ways, end to end."""

import urllib.request

import pytest
import socketio
from flask import Flask

from siocluster import App, AppNode
from siocluster.seed import (
    AppMessage,
    IoListener,
    IoMessage,
    Listener,
    make_app_server,
    make_io_listener,
    make_io_server,
    make_listener,
)
from tests.helpers import wait_until


def io_listener(cluster, server_or_wsgi_app=None):
    """An io-node made by the seed's shortcut, listening on loopback, stopped with the cluster."""
    node = make_io_listener(server_or_wsgi_app, cluster.config)
    cluster.io_nodes.append(node)
    node.start_server(("127.0.0.1", 0))
    return node


def listener(cluster):
    """The seed's app-node adapter, stopped with the cluster (the test starts it)."""
    io = make_listener(cluster.config)
    cluster.app_nodes.append(io.node)
    return io


def test_shortcuts_make_nodes_of_the_right_kind(cluster):
    sio = socketio.Server(async_mode="gevent")
    node = make_io_server(sio, cluster.config)
    assert isinstance(node, IoListener)
    assert node.sio is sio and node.socket_io is sio and node.server is node
    assert node.id not in node.state.nodes()          # made, not started

    app_node = make_app_server(cluster.config)
    assert isinstance(app_node, AppNode) and isinstance(app_node.app, Listener)
    app = App()
    assert make_app_server(cluster.config, app).app is app

    with pytest.raises(TypeError, match="socketio.Server"):
        make_io_listener(8081, cluster.config)
    with pytest.raises(TypeError, match="socketio.Server"):
        make_io_server(object(), cluster.config)

    # the io-node made around our own server works once started
    cluster.io_nodes.append(node)
    node.start()
    node.start_server(("127.0.0.1", 0))
    io = listener(cluster)
    io.on("ping", lambda sid: "pong")
    io.start()
    assert cluster.client(node).call("ping") == ["pong"]


def test_io_listener_serves_a_wsgi_app_beside_socket_io(cluster):
    site = Flask(__name__)
    site.add_url_rule("/hello", "hello", lambda: "hello from the site")
    node = io_listener(cluster, site)
    io = listener(cluster)
    io.on("ping", lambda sid: "pong")
    io.start()
    port = node.address[1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/hello", timeout=5) as response:
        assert response.read() == b"hello from the site"
    assert cluster.client(node).call("ping") == ["pong"]


def test_listener_maps_the_seed_events_and_publishes_messages(cluster):
    node = io_listener(cluster)
    io = listener(cluster)
    seen = []

    @io.on("connection")
    def connection(sid, environ):
        seen.append(("connection", sid))

    @io.on("message")
    def message(sid, data):
        seen.append(("message", sid, data))
        io.create_message({"echo": data}).for_client(sid).send()

    @io.on("disconnect")
    def disconnect(sid, reason):
        seen.append(("disconnect", sid))

    io.start()
    client = cluster.client(node)
    sid = client.sid
    client.sio.send("hi")
    assert client.expect("message") == [[{"echo": "hi"}]]
    client.sio.disconnect()
    wait_until(lambda: ("disconnect", sid) in seen, message="no disconnect event")
    assert seen == [("connection", sid), ("message", sid, "hi"), ("disconnect", sid)]


def test_io_node_events_and_io_node_messages_to_the_app(cluster):
    node = io_listener(cluster)
    events = []

    @node.on("socket connection")
    def connection(client):
        events.append(("connection", client.sid))
        # io-node code speaks for its client: the app's "io-hello" handler gets it
        node.create_message(client, {"io_node": node.id}).set_type("io-hello").send()

    node.on("socket message",
            lambda client, event, args: events.append(("message", client.sid, event, args)))
    node.on("socket disconnect", lambda client: events.append(("disconnect", client.sid)))

    io = listener(cluster)

    @io.on("io-hello")
    def io_hello(sid, data):
        io.emit("welcome", data, to=sid)

    @io.on("message")
    def message(sid, data):
        io.create_message(["got", data]).for_client(sid).send()

    io.start()
    client = cluster.client(node)
    sid = client.sid
    assert client.expect("welcome") == [[{"io_node": node.id}]]

    # by sid, with the default type "message"; the seed's camelCase names work too
    assert node.createMessage(sid).setData("from io").send() is True
    assert client.expect("message") == [[["got", "from io"]]]
    client.sio.send("from client")
    assert client.expect("message", count=2)[1] == [["got", "from client"]]

    with pytest.raises(LookupError, match="holds no client"):
        node.create_message("no-such-sid")
    with pytest.raises(ValueError, match="set_client"):
        IoMessage(node, data="x").send()

    client.sio.disconnect()
    wait_until(lambda: ("disconnect", sid) in events, message="no socket disconnect event")
    # messages of io-node code are not the client's own: no "socket message" for them
    assert events == [("connection", sid), ("message", sid, "message", ["from client"]),
                      ("disconnect", sid)]


def test_app_messages_reach_clients_channels_and_everyone_across_io_nodes(cluster):
    io1, io2 = io_listener(cluster), io_listener(cluster)
    hooks = {io1.id: [], io2.id: []}
    for n in (io1, io2):
        n.on("app subscribe-to-channel",
             lambda c, n=n: hooks[n.id].append(("subscribe", c["sid"], c["room"])))
        n.on("app unsubscribe-from-channel",
             lambda c, n=n: hooks[n.id].append(("unsubscribe", c["sid"], c["room"])))
        n.on("app publish", lambda c, n=n: hooks[n.id].append(("publish", c["event"])))

    io = listener(cluster)

    @io.on("join")
    def join(sid, channel):
        io.create_message(channel).set_type("subscribe-to-channel").for_client(sid).send()

    @io.on("leave")
    def leave(sid, channel):
        io.create_message(channel).set_type("unsubscribe-from-channel").for_client(sid).send()

    @io.on("publish")
    def publish(sid, spec):
        message = io.create_message(spec["text"]).set_event("news")
        for recipient in spec["to"]:
            message.add_recipient(*recipient)
        for skipped in spec.get("except", []):
            message.except_client(skipped)
        message.send()
        io.emit("done", spec["text"])      # a marker to everyone, after the message

    io.start()
    a, b, c = cluster.client(io1), cluster.client(io2), cluster.client(io2)
    a.call("join", "lobby")
    b.call("join", "lobby")
    assert io.room_members("lobby") == sorted([a.sid, b.sid])

    published = 0

    def news_after(spec):
        nonlocal published
        before = {x: len(x.received("news")) for x in (a, b, c)}
        a.call("publish", spec)
        published += 1
        for x in (a, b, c):
            x.expect("done", count=published)
        return [x.received("news")[before[x]:] for x in (a, b, c)]

    assert news_after({"text": "1", "to": [("channel", "lobby")], "except": [a.sid]}) == \
        [[], [["1"]], []]
    assert news_after({"text": "2", "to": [("all",)]}) == [[["2"]], [["2"]], [["2"]]]
    assert news_after({"text": "3", "to": [("client", c.sid)]}) == [[], [], [["3"]]]
    # a client reached twice (itself and its channel) gets it once; except wins
    assert news_after({"text": "4", "to": [("client", a.sid), ("channel", "lobby")],
                       "except": [b.sid]}) == [[["4"]], [], []]
    b.call("leave", "lobby")
    assert io.room_members("lobby") == [a.sid]
    assert news_after({"text": "5", "to": [("channel", "lobby")]}) == [[["5"]], [], []]

    # each io-node fires the channel events for the clients it holds
    assert [h for h in hooks[io1.id] if h[0] != "publish"] == [("subscribe", a.sid, "lobby")]
    assert [h for h in hooks[io2.id] if h[0] != "publish"] == [("subscribe", b.sid, "lobby"),
                                                               ("unsubscribe", b.sid, "lobby")]
    assert ("publish", "news") in hooks[io1.id] and ("publish", "news") in hooks[io2.id]


def test_custom_message_reaches_io_node_code_on_every_io_node(cluster):
    io1, io2 = io_listener(cluster), io_listener(cluster)
    received = {io1.id: [], io2.id: []}
    for n in (io1, io2):
        @n.on("app tag")
        def app_tag(message, n=n):
            received[n.id].append(message)
            for client in n.clients_of(message):
                client.data.update(message["data"])

    io = listener(cluster)
    io.on("join", lambda sid, room: io.enter_room(sid, room))

    @io.on("tag")
    def tag(sid, room):
        io.create_message({"colour": "red"}).set_type("tag").for_channel(room) \
            .except_client(sid).send()

    io.start()
    a, b, c = cluster.client(io1), cluster.client(io2), cluster.client(io2)
    a.call("join", "team")
    b.call("join", "team")
    a.call("tag", "team")
    wait_until(lambda: received[io2.id], message="io2 did not get the app tag message")
    message = received[io2.id][0]
    assert message["type"] == "tag" and message["data"] == {"colour": "red"}
    assert message["recipients"] == [{"type": "channel", "id": "team"}]
    assert message["except"] == [a.sid]
    assert received[io1.id] == [message]                # every io-node gets it
    assert io2.clients[b.sid].data == {"colour": "red"}
    assert io2.clients[c.sid].data == {}                # not in the channel
    assert io1.clients[a.sid].data == {}                # excepted


def test_seed_example_set_user_id_travels_with_every_message(cluster):
    """The seed README's io-node example: ``app setUserId`` stores a user id on the client,
    and get_client_info sends it (and the client's channel) with each of its messages."""
    node = io_listener(cluster)

    def get_client_info(client):
        channels = [r for r in node.socket_io.rooms(client.sid, client.namespace)
                    if r != client.sid]
        return {"sid": client.sid, "userId": client.data.get("userId"),
                "puzzleId": channels[0] if channels else None}

    node.get_client_info = get_client_info

    @node.server.on("app setUserId")
    def set_user_id(message):
        client = node.clients.get(message["recipients"][0]["id"])
        if client is not None:
            client.data["userId"] = message["data"]

    io = listener(cluster)

    @io.on("login")
    def login(sid, user_id):
        io.createMessage(user_id).setType("setUserId").forClient(sid).send()
        return "ok"

    @io.on("enter")
    def enter(sid, puzzle):
        io.createMessage(puzzle).setType("subscribe-to-channel").forClient(sid).send()
        return "ok"

    @io.on("whoami")
    def whoami(sid):
        info = io.client_info()
        return info["userId"], info["puzzleId"]

    io.start()
    client, other = cluster.client(node), cluster.client(node)
    assert client.call("whoami") == [None, None]
    assert client.call("login", 42) == ["ok"]
    assert client.call("enter", "puzzle-7") == ["ok"]
    assert client.call("whoami") == [42, "puzzle-7"]
    assert other.call("whoami") == [None, None]


def test_no_client_after_an_app_node_restart_carries_the_client_info(cluster):
    node = io_listener(cluster)
    node.get_client_info = lambda client: {**client.info, "userId": client.data.get("userId")}
    node.on("app setUserId", lambda m: [c.data.update(userId=m["data"])
                                        for c in node.clients_of(m)])

    first = listener(cluster)
    connected, first_no_client = [], []
    first.on("connection", lambda sid, environ: connected.append(sid))
    first.on("no-client", lambda sid, info: first_no_client.append(sid))
    first.on("login", lambda sid, user_id:
             first.create_message(user_id).set_type("setUserId").for_client(sid).send())
    first.start()
    client = cluster.client(node)
    assert client.call("login", 7) == []
    assert connected == [client.sid] and first_no_client == []
    first.stop()

    second = listener(cluster)
    rebuilt = []

    @second.on("no-client")
    def no_client(sid, info):
        rebuilt.append((sid, info["userId"], info["io_node"]))

    second.on("whoami", lambda sid: second.client_info()["userId"])
    second.start()
    assert client.call("whoami") == [7]
    assert client.call("whoami") == [7]
    assert rebuilt == [(client.sid, 7, node.id)]        # once, before its first message


def test_app_message_refuses_what_it_cannot_send(cluster, redis_client):
    io = listener(cluster)                              # not started: sends go straight out
    with pytest.raises(ValueError, match="no recipients"):
        io.create_message("x").send()
    with pytest.raises(ValueError, match="recipient type"):
        io.create_message("x").add_recipient("room", "r")
    with pytest.raises(ValueError, match="needs its id"):
        io.create_message("x").add_recipient("client")
    with pytest.raises(TypeError, match="not JSON"):
        io.create_message(b"\x00").set_type("custom").for_all().send()
    with pytest.raises(ValueError, match="channel name"):
        io.create_message(None).set_type("subscribe-to-channel").for_client("s").send()
    with pytest.raises(ValueError, match="for clients only"):
        io.create_message("r").set_type("subscribe-to-channel").for_all().send()
    io.create_message("x").for_client("s").except_client("s").send()   # nobody left: no-op
    assert redis_client.exists(io.node.keys.commands) == 0
    assert isinstance(AppMessage(io, "x").for_all(), AppMessage)
    io.create_message("x").for_all().send()
    assert redis_client.xlen(io.node.keys.commands) == 1
