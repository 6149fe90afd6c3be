"""python-socketio parity for app code, acks both ways, sessions, and cluster-wide state,
through real clients, io-nodes, app-nodes and Redis."""

import time

import gevent
import gevent.event
import gevent.queue
import pytest
import socketio

from siocluster import App, CallTimeout
from tests.helpers import wait_until

BURST = 20      # events one client sends back to back


def url(io_node):
    return f"http://127.0.0.1:{io_node.address[1]}"


# ---- handlers and namespaces --------------------------------------------------------------

def test_namespaces_are_kept_apart(cluster):
    app = App()
    for ns in ("/", "/chat"):
        @app.on("join", namespace=ns)
        def join(sid, room, ns=ns):
            app.enter_room(sid, room, namespace=ns)

        @app.on("where", namespace=ns)
        def where(sid, ns=ns):
            return ns

        @app.on("shout", namespace=ns)
        def shout(sid, room, ns=ns):
            app.emit("shouted", ns, to=room, namespace=ns)
            app.emit("done", ns, namespace=ns)      # a marker to the whole namespace, after

    io = cluster.io_node()
    cluster.app_node(app)
    a = cluster.client(io, namespaces=["/", "/chat"])
    b = cluster.client(io)
    a_chat = a.sio.get_sid("/chat")
    assert a.call("where", namespace="/chat") == ["/chat"]
    assert a.call("where") == ["/"]
    a.call("join", "r", namespace="/chat")
    b.call("join", "r")
    # the same room name in two namespaces is two rooms
    assert app.room_members("r", namespace="/chat") == [a_chat]
    assert app.room_members("r") == [b.sid]
    assert app.count("/chat") == 1 and app.count("/") == 2

    a.call("shout", "r", namespace="/chat")
    a.expect("done", namespace="/chat")
    assert a.received("shouted", namespace="/chat") == [["/chat"]]
    b.call("shout", "r")
    b.expect("done")
    a.expect("done")
    assert b.received("shouted") == [["/"]]
    assert a.received("shouted") == []              # a is in "r" of /chat only


def test_catch_all_handlers_in_python_socketio_order(cluster):
    app = App()

    @app.on("*", namespace="/chat")
    def chat_anything(event, sid, *args):
        return ["chat catch-all", event, list(args)]

    @app.on("ping", namespace="*")
    def ping_anywhere(namespace, sid):
        return ["ping in", namespace]

    @app.on("*", namespace="*")
    def anything_anywhere(event, namespace, sid, *args):
        return ["catch-all", event, namespace]

    @app.on("ping", namespace="/chat")
    def chat_ping(sid):
        return ["chat ping"]

    io = cluster.io_node()
    cluster.app_node(app)
    client = cluster.client(io, namespaces=["/", "/chat", "/game"])
    assert client.call("ping", namespace="/chat") == [["chat ping"]]
    assert client.call("hop", 1, namespace="/chat") == [["chat catch-all", "hop", [1]]]
    assert client.call("ping", namespace="/game") == [["ping in", "/game"]]
    assert client.call("hop", namespace="/game") == [["catch-all", "hop", "/game"]]


def test_class_based_namespace(cluster):
    class Chat(socketio.Namespace):
        def on_connect(self, sid, environ, auth):
            if auth != {"token": "good"}:
                return False

        def on_join(self, sid, room):
            self.enter_room(sid, room)
            self.emit("joined", room, to=room)
            return "ok"

        def on_remember(self, sid, text):
            with self.session(sid) as session:
                session["text"] = text
            return self.get_session(sid)

        def on_ping(self, sid):
            return "from the class"

    app = App()
    app.register_namespace(Chat("/chat"))
    app.on("ping", lambda sid: "from a function", namespace="/chat")   # functions go first
    with pytest.raises(ValueError, match="socketio.Namespace"):
        app.register_namespace(object())

    io = cluster.io_node()
    cluster.app_node(app)
    client = cluster.client(io, namespaces=["/chat"], auth={"token": "good"})
    assert client.call("join", "room", namespace="/chat") == ["ok"]
    assert client.expect("joined", namespace="/chat") == [["room"]]
    assert client.call("remember", "hello", namespace="/chat") == [{"text": "hello"}]
    assert client.call("ping", namespace="/chat") == ["from a function"]

    refused = cluster.client(io, connect=False)
    with pytest.raises(socketio.exceptions.ConnectionError):
        refused.connect_to(io, namespaces=["/chat"], auth={"token": "bad"})


# ---- connect ------------------------------------------------------------------------------

def test_connect_handler_gets_environ_and_auth(cluster):
    app = App()
    seen = []

    @app.event
    def connect(sid, environ, auth):
        seen.append((sid, environ, auth))

    io = cluster.io_node()
    cluster.app_node(app)
    client = cluster.client(io, connect=False)
    client.sio.connect(url(io) + "/?room=blue", transports=["websocket"],
                       headers={"X-Team": "red"}, auth={"token": "t0k"}, wait_timeout=5)
    [(sid, environ, auth)] = seen
    assert sid == client.sid
    assert auth == {"token": "t0k"}
    assert environ["HTTP_X_TEAM"] == "red"
    assert "room=blue" in environ["QUERY_STRING"]
    assert environ["REMOTE_ADDR"] == "127.0.0.1"


def refuse_false(sid, environ, auth):
    return False


def refuse_socketio(sid, environ, auth):
    raise socketio.exceptions.ConnectionRefusedError("no token", {"code": 401})


def refuse_python(sid, environ, auth):
    raise ConnectionRefusedError("banned here")


@pytest.mark.parametrize("handler, error", [
    (refuse_false, {"message": "Connection rejected by server"}),
    (refuse_socketio, {"message": "no token", "data": {"code": 401}}),
    (refuse_python, {"message": "banned here"}),
])
def test_connect_refusal_reaches_the_client_with_its_message(cluster, handler, error):
    app = App()
    app.on("connect", handler)
    io = cluster.io_node()
    cluster.app_node(app)
    client = cluster.client(io, connect=False)
    errors = []
    client.sio.on("connect_error", errors.append)
    with pytest.raises(socketio.exceptions.ConnectionError):
        client.connect_to(io)
    assert errors == [error]
    assert not client.sio.connected
    wait_until(lambda: app.count() == 0 and not io.clients,
               message="the refused client is still counted")


def test_no_verdict_in_time_refuses_when_configured_and_leaves_nothing_behind(cluster):
    io = cluster.io_node(connect_timeout=0.5, connect_timeout_accept=False)
    client = cluster.client(io, connect=False)      # no app-node yet: no verdict comes
    errors = []
    client.sio.on("connect_error", errors.append)
    with pytest.raises(socketio.exceptions.ConnectionError):
        client.connect_to(io)
    assert len(errors) == 1 and "no answer" in errors[0]["message"]

    # the app tier, when it comes, sees the connect and then its disconnect
    app = App()
    seen = []
    app.on("connect", lambda sid, environ: seen.append("connect"))
    app.on("disconnect", lambda sid, reason: seen.append(("disconnect", reason)))
    cluster.app_node(app)
    wait_until(lambda: len(seen) == 2, message="the late connect was not paired")
    assert seen == ["connect", ("disconnect", "connect timed out")]
    wait_until(lambda: app.count() == 0, message="the refused client is still counted")


def test_two_argument_connect_handler(cluster):
    app = App()
    seen = []
    app.on("connect", lambda sid, environ: seen.append(sid))
    io = cluster.io_node()
    cluster.app_node(app)
    client = cluster.client(io)
    assert seen == [client.sid]


# ---- acks both ways ---------------------------------------------------------------------

def test_client_acks_get_zero_one_or_several_values(cluster):
    app = App()
    app.on("none", lambda sid: None)
    app.on("one", lambda sid, value: value)
    app.on("several", lambda sid, a, b: (b, a, a + b))
    app.on("a_list", lambda sid: [1, 2])          # a list is one value; a tuple is several
    io = cluster.io_node()
    cluster.app_node(app)
    client = cluster.client(io)
    assert client.call("none") == []
    assert client.call("one", {"a": 1}) == [{"a": 1}]
    assert client.call("several", 1, 2) == [2, 1, 3]
    assert client.call("a_list") == [[1, 2]]


def answering_client(cluster, io):
    """A client that answers the server's events with zero, one, several values, or late."""
    client = cluster.client(io, connect=False)
    release = gevent.event.Event()
    client.sio.on("zero", lambda *args: None)
    client.sio.on("one", lambda data: data.upper())
    client.sio.on("several", lambda data: (data, 2, [3]))
    client.sio.on("late", lambda data: release.wait(10) and "too late")
    client.connect_to(io)
    return client, release


def test_call_returns_the_clients_answer_or_times_out(cluster):
    app = App()

    @app.on("ask")
    def ask(sid, event, timeout):
        try:
            return ["answer", app.call(event, "q", to=sid, timeout=timeout)]
        except TimeoutError as exc:
            return ["timeout", isinstance(exc, socketio.exceptions.TimeoutError)]

    io = cluster.io_node()
    cluster.app_node(app)
    client, release = answering_client(cluster, io)
    assert client.call("ask", "zero", 2) == [["answer", None]]
    assert client.call("ask", "one", 2) == [["answer", "Q"]]
    assert client.call("ask", "several", 2) == [["answer", ["q", 2, [3]]]]
    started = time.monotonic()
    assert client.call("ask", "late", 0.5) == [["timeout", True]]
    assert 0.5 <= time.monotonic() - started < 2.5
    release.set()


def test_call_and_emit_callback_outside_a_handler(cluster):
    app = App()
    io = cluster.io_node()
    cluster.app_node(app)
    client, release = answering_client(cluster, io)
    assert app.call("several", "x", to=client.sid) == ("x", 2, [3])
    assert app.call("zero", to=client.sid) is None

    answers = gevent.queue.Queue()
    app.emit("one", "cb", to=client.sid, callback=lambda *args: answers.put(args))
    assert answers.get(timeout=5) == ("CB",)

    with pytest.raises(CallTimeout) as caught:
        app.call("late", "x", to=client.sid, timeout=0.3)
    assert isinstance(caught.value, TimeoutError)
    assert isinstance(caught.value, socketio.exceptions.TimeoutError)
    release.set()
    with pytest.raises(ValueError, match="one client"):
        app.call("one", "x", to=["a", "b"])


# ---- emit, send, rooms, disconnect ------------------------------------------------------

def test_send_emit_to_rooms_and_background_tasks(cluster):
    app = App()
    app.on("join", lambda sid, room: app.enter_room(sid, room))

    @app.on("greet")
    def greet(sid):
        app.send("hello", to=sid)
        # several rooms: a member of both gets it once
        app.emit("news", "for red and blue", to=["red", "blue"])
        app.emit("done", namespace="/")

    @app.on("tick")
    def tick(sid, n):
        def ticker():
            for i in range(n):
                app.sleep(0.01)
                app.emit("tock", i, to=sid)
        app.start_background_task(ticker)
        return "started"

    io1, io2 = cluster.io_node(), cluster.io_node()
    cluster.app_node(app)
    red, both, none = cluster.client(io1), cluster.client(io2), cluster.client(io2)
    red.call("join", "red")
    both.call("join", "red")
    both.call("join", "blue")
    red.call("greet")
    for client in (red, both, none):
        client.expect("done")
    assert red.received("message") == [["hello"]]
    assert red.received("news") == both.received("news") == [["for red and blue"]]
    assert none.received("news") == []

    assert red.call("tick", 3) == ["started"]
    assert red.expect("tock", count=3) == [[0], [1], [2]]


def test_a_long_handler_sends_progress_when_it_sleeps(cluster):
    app = App()
    release = gevent.event.Event()

    @app.on("work")
    def work(sid):
        app.emit("progress", 1, to=sid)
        app.sleep(0)                 # sends the progress now, not when the handler returns
        release.wait(5)
        app.emit("progress", 2, to=sid)
        return "done"

    io = cluster.io_node()
    cluster.app_node(app)
    client = cluster.client(io)
    answer = gevent.event.AsyncResult()
    client.sio.emit("work", callback=answer.set)
    assert client.expect("progress") == [[1]]
    assert not answer.ready()        # the handler is still at work
    release.set()
    assert answer.get(timeout=5) == "done"
    assert client.expect("progress", count=2) == [[1], [2]]


def test_rooms_close_room_and_disconnect_handler_reads_rooms_and_session(cluster):
    app = App()
    gone = gevent.queue.Queue()
    app.on("join", lambda sid, room: app.enter_room(sid, room))
    app.on("rooms", lambda sid: app.rooms(sid))

    @app.on("name")
    def name(sid, value):
        with app.session(sid) as session:
            session["name"] = value

    @app.on("close")
    def close(sid, room):
        app.close_room(room)
        app.emit("after-close", to=room)
        app.emit("done")

    @app.on("kick")
    def kick(sid, other):
        app.disconnect(other)

    @app.event
    def disconnect(sid, reason):
        gone.put((sid, reason, app.rooms(sid), app.get_session(sid)))

    io1, io2 = cluster.io_node(), cluster.io_node()
    cluster.app_node(app)
    a, b = cluster.client(io1), cluster.client(io2)
    a.call("join", "x")
    a.call("join", "y")
    b.call("join", "x")
    assert a.call("rooms") == [[a.sid, "x", "y"]]
    a.call("close", "x")
    b.expect("done")
    a.expect("done")
    assert a.received("after-close") == [] and b.received("after-close") == []
    assert a.call("rooms") == [[a.sid, "y"]] and app.room_members("x") == []

    a.call("name", "ada")
    a_sid = a.sid
    b.call("kick", a_sid)                          # a is on the other io-node
    sid, reason, rooms, session = gone.get(timeout=5)
    assert (sid, rooms, session) == (a_sid, [a_sid, "y"], {"name": "ada"})
    assert reason == socketio.Server.reason.SERVER_DISCONNECT
    wait_until(lambda: not a.sio.connected, message="a was not disconnected")
    # forgotten once the handler ran
    assert app.rooms(a_sid) == [a_sid] and app.get_session(a_sid) == {}
    assert app.client(a_sid) is None and app.room_members("y") == []

    b_sid = b.sid
    b.sio.disconnect()
    sid, reason, _, _ = gone.get(timeout=5)
    # python-socketio's own server says "transport close" here too, for a websocket client
    assert sid == b_sid and reason in (socketio.Server.reason.CLIENT_DISCONNECT,
                                       socketio.Server.reason.TRANSPORT_CLOSE)


# ---- sessions -----------------------------------------------------------------------------

def test_a_session_written_by_one_app_node_is_read_by_another(cluster):
    writer, reader = App(), App()

    @writer.on("login")
    def login(sid, name):
        with writer.session(sid) as session:
            session["name"] = name

    @writer.on("visit")
    def visit(sid):
        session = writer.get_session(sid)
        session["visits"] = session.get("visits", 0) + 1
        writer.save_session(sid, session)

    @reader.on("whoami")
    def whoami(sid):
        return reader.get_session(sid)

    io = cluster.io_node()
    first = cluster.app_node(writer)
    client = cluster.client(io)
    client.call("login", "ada")
    client.call("visit")
    client.call("visit")
    first.stop()
    cluster.app_node(reader)
    assert client.call("whoami") == [{"name": "ada", "visits": 2}]


# ---- cluster-wide state -------------------------------------------------------------------

def test_cluster_state_through_joins_leaves_and_disconnects(cluster):
    app = App()
    app.on("join", lambda sid, room: app.enter_room(sid, room))
    app.on("leave", lambda sid, room: app.leave_room(sid, room))

    @app.on("who")
    def who(sid, room):
        # what a chat's "who is online" needs, read inside a handler of either app-node
        return {"members": app.room_members(room), "count": app.count(),
                "nodes": sorted(c["node"] for c in app.room_clients(room))}

    io1, io2 = cluster.io_node(), cluster.io_node()
    cluster.app_node(app)
    cluster.app_node(app)
    a, b, c = cluster.client(io1), cluster.client(io2), cluster.client(io2)

    assert app.count() == 3
    records = {r["sid"]: r for r in app.clients()}
    assert sorted(records) == sorted([a.sid, b.sid, c.sid])
    assert records[a.sid]["node"] == io1.id and records[b.sid]["node"] == io2.id
    assert records[a.sid]["namespace"] == "/"
    assert records[a.sid]["info"]["io_node"] == io1.id
    assert records[a.sid]["info"]["remote_addr"] == "127.0.0.1"
    assert app.client(c.sid)["node"] == io2.id

    a.call("join", "lobby")
    b.call("join", "lobby")
    b.call("join", "kitchen")
    c.call("join", "kitchen")
    assert c.call("who", "lobby") == [{"members": sorted([a.sid, b.sid]), "count": 3,
                                       "nodes": sorted([io1.id, io2.id])}]
    assert app.rooms(b.sid) == [b.sid, "kitchen", "lobby"]

    b.call("leave", "lobby")
    assert a.call("who", "lobby")[0]["members"] == [a.sid]
    assert app.rooms(b.sid) == [b.sid, "kitchen"]

    c_sid = c.sid
    c.sio.disconnect()
    wait_until(lambda: app.count() == 2, message="the disconnected client is still counted")
    assert app.room_members("kitchen") == [b.sid]
    assert app.client(c_sid) is None and app.rooms(c_sid) == [c_sid]
    assert sorted(r["sid"] for r in app.clients()) == sorted([a.sid, b.sid])
    assert a.call("who", "kitchen") == [{"members": [b.sid], "count": 2, "nodes": [io2.id]}]


# ---- the worked example: a python-socketio app moved to siocluster ------------------------

def chat_transcript(connect):
    """The same conversation with the example chat, whoever serves it; ``connect(auth)``
    returns a connected `EventClient`."""
    with pytest.raises(socketio.exceptions.ConnectionError):
        connect({})
    ada, bob = connect({"name": "ada"}), connect({"name": "bob"})
    answers = [ada.call("join", "lobby"), bob.call("join", "lobby")]
    ada.expect("joined")
    answers.append(bob.call("say", "hi ada"))
    for client in (ada, bob):
        client.expect("said")
    # a burst from one client, sent back to back: handled in order, no count lost
    counts = gevent.queue.Queue()
    for n in range(BURST):
        bob.sio.emit("say", f"#{n}")
        bob.sio.emit("count", callback=counts.put)
    answers.append([counts.get(timeout=10) for _ in range(BURST)])
    for client in (ada, bob):
        client.expect("said", count=1 + BURST)
    bob.sio.disconnect()
    ada.expect("left")
    return answers, ada.events, bob.events


def test_the_moved_example_behaves_as_before(cluster):
    from gevent import pywsgi
    from geventwebsocket.handler import WebSocketHandler

    from examples.moved_from_python_socketio import chat_after, chat_before

    # before: python-socketio on one server
    server = pywsgi.WSGIServer(("127.0.0.1", 0), socketio.WSGIApp(chat_before.sio),
                               handler_class=WebSocketHandler, log=None)
    server.start()
    refusals = []

    def connect_before(auth):
        client = cluster.client(None, connect=False)
        if not auth:
            # (a handler on "/" would hide the client's catch-all recorder there)
            client.sio.on("connect_error", refusals.append)
        client.sio.connect(f"http://127.0.0.1:{server.address[1]}", transports=["websocket"],
                           auth=auth, wait_timeout=5)
        return client

    try:
        before = chat_transcript(connect_before)
    finally:
        server.stop(timeout=1)

    # after: the same handlers as a cluster of two io-nodes and two app-nodes
    io_nodes = [cluster.io_node(), cluster.io_node()]
    cluster.app_node(chat_after.sio)
    cluster.app_node(chat_after.sio)
    connected = []

    def connect_after(auth):
        client = cluster.client(None, connect=False)
        if not auth:
            client.sio.on("connect_error", refusals.append)
        client.connect_to(io_nodes[len(connected) % 2], auth=auth)   # ada and bob apart
        connected.append(client)
        return client

    after = chat_transcript(connect_after)

    assert after == before
    answers, ada_events, bob_events = after
    burst = [("/", "said", [{"name": "bob", "text": f"#{n}"}]) for n in range(BURST)]
    assert answers == [[{"room": "lobby", "you": "ada"}], [{"room": "lobby", "you": "bob"}],
                       ["ok"], list(range(1, BURST + 1))]
    assert ada_events == [("/", "joined", [{"name": "bob"}]),
                          ("/", "said", [{"name": "bob", "text": "hi ada"}]), *burst,
                          ("/", "left", [{"name": "bob"}])]
    assert bob_events == [("/", "said", [{"name": "bob", "text": "hi ada"}]), *burst]
    message = "tell us your name: connect with auth={'name': ...}"
    assert refusals == [{"message": message}, {"message": message}]
