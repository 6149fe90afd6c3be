"""Defences that fail closed, each through real sockets: a connect is let in only on an
explicit yes, clients cannot reach the lifecycle handlers or unhandled namespaces, malformed
events stop at the io-node, a client that left is never kept, and taken messages are never
stranded."""

import json
import logging

import gevent
import gevent.event
import gevent.queue
import pytest
import requests
import socketio
import websocket
from redis.exceptions import ConnectionError as RedisConnectionError

from siocluster import App, AppNode
from siocluster.app import HANDLER_FAILED, UNHANDLED_NAMESPACE
from siocluster.ionode import MALFORMED, NO_VERDICT, RESERVED
from siocluster.state import ClusterState, Keys
from tests.helpers import EventClient, hold_listener, inbox_messages, inbox_of, wait_until


def refusal_of(cluster, io, **connect):
    """Connect a real client that must be refused; returns what its connect_error said."""
    client = cluster.client(io, connect=False)
    errors = []
    client.sio.on("connect_error", errors.append, namespace=connect.get("namespace", "/"))
    with pytest.raises(socketio.exceptions.ConnectionError):
        client.connect_to(io, namespaces=[connect.get("namespace", "/")],
                          auth=connect.get("auth"))
    wait_until(lambda: errors, message="no connect_error")
    return errors[0]


class RawClient:
    """Socket.IO spoken by hand over a real websocket: frames no well-behaved client sends."""

    def __init__(self, io):
        self.ws = websocket.create_connection(
            f"ws://127.0.0.1:{io.address[1]}/socket.io/?EIO=4&transport=websocket", timeout=5)
        assert self.ws.recv().startswith("0{")          # Engine.IO open

    def connect(self, namespace="/", auth=None):
        data = json.dumps(auth) if auth is not None else ""
        self.ws.send("40" + data if namespace == "/" else f"40{namespace},{data}")
        return self.next_packet()

    def next_packet(self):
        """The next Socket.IO packet, answering Engine.IO pings on the way."""
        while True:
            frame = self.ws.recv()
            if frame == "2":
                self.ws.send("3")
                continue
            return frame

    def close(self):
        self.ws.close()


def readme_app(log):
    """The README's chat connect handler, which a careless auth makes raise."""
    app = App()

    @app.event
    def connect(sid, environ, auth):
        if not auth or "name" not in auth:
            raise ConnectionRefusedError("who are you?")
        log.append(("connect", sid))

    @app.event
    def disconnect(sid, reason):
        log.append(("disconnect", sid))

    @app.on("hello")
    def hello(sid, *args):
        log.append(("hello", sid, list(args)))
        return "hi"

    return app


# ---- a connect is let in only on an explicit yes ----------------------------------------------

def test_a_connect_handler_that_raises_refuses_at_once_and_dead_letters_nothing(
        cluster, redis_client, caplog):
    log = []
    io = cluster.io_node(connect_timeout=30)       # a refusal that waited would time the test out
    cluster.app_node(readme_app(log))
    with caplog.at_level(logging.ERROR, logger="siocluster.app-node"):
        # `"name" in True` raises TypeError
        assert refusal_of(cluster, io, auth=True) == {"message": HANDLER_FAILED}
    assert "TypeError" in caplog.text                # the exception goes to the log
    keys = Keys(cluster.config.prefix)
    assert redis_client.llen(keys.dead) == 0
    wait_until(lambda: ClusterState(redis_client, keys).count() == 0,
               message="the refused client's record stayed")
    assert log == []
    # a well-formed auth still gets in
    assert cluster.client(io, auth={"name": "ann"}).call("hello") == ["hi"]


def test_no_verdict_in_time_refuses_by_default_saying_to_retry(cluster):
    io = cluster.io_node(connect_timeout=0.3)        # no app-node: no verdict ever comes
    assert refusal_of(cluster, io) == {"message": NO_VERDICT}


# ---- clients cannot reach what is not theirs ---------------------------------------------------

@pytest.mark.parametrize("event", ["connect", "disconnect", "no-client"])
def test_an_event_named_after_a_lifecycle_handler_is_refused_at_the_io_node(cluster, event):
    log = []
    io = cluster.io_node()
    cluster.app_node(readme_app(log))
    client = cluster.client(io, auth={"name": "ann"})
    assert client.call(event, {"name": "mallory"}) == [{"ok": False, "error": RESERVED}]
    assert client.expect("error")[0] == [{"event": event, "error": RESERVED}]
    assert client.call("hello") == ["hi"]            # barrier: the app saw all it will see
    assert [entry[0] for entry in log] == ["connect", "hello"]
    assert client.sio.connected


def test_an_event_whose_name_is_not_a_string_is_refused_at_the_io_node(cluster, redis_client):
    io = cluster.io_node()
    cluster.app_node(readme_app([]))
    raw = RawClient(io)
    try:
        assert raw.connect(auth={"name": "ann"}).startswith("40")
        raw.ws.send('42[1,"' + "x" * 100_000 + '"]')
        refusal = raw.next_packet()
        assert refusal.startswith("42")
        assert json.loads(refusal[2:]) == ["error", {"event": "1", "error": MALFORMED}]
    finally:
        raw.close()
    assert redis_client.llen(Keys(cluster.config.prefix).dead) == 0


def test_a_namespace_the_app_does_not_handle_is_refused(cluster):
    app = App()

    @app.on("ping", namespace="/chat")
    def ping(sid):
        return "pong"

    io = cluster.io_node()
    cluster.app_node(app)
    assert refusal_of(cluster, io, namespace="/anything") == {"message": UNHANDLED_NAMESPACE}
    client = cluster.client(io, namespaces=["/chat"])
    assert client.call("ping", namespace="/chat") == ["pong"]


# ---- a client that left is never kept -----------------------------------------------------------

def test_a_transport_closed_while_its_connect_waits_leaves_nothing_and_is_heard(
        cluster, redis_client):
    """python-socketio tells no one of a client that leaves before it is connected: the
    io-node, given the app's yes too late, must see it gone and tell the app tier."""
    log = []
    release = gevent.event.Event()
    app = App()

    @app.event
    def connect(sid, environ):
        log.append(("connect", sid))
        release.wait(10)

    @app.event
    def disconnect(sid, reason):
        log.append(("disconnect", sid))

    io = cluster.io_node(connect_timeout=30)
    cluster.app_node(app)
    url = f"http://127.0.0.1:{io.address[1]}/socket.io/"
    opened = requests.get(url, params={"EIO": "4", "transport": "polling"}, timeout=5)
    params = {"EIO": "4", "transport": "polling",
              "sid": json.loads(opened.text[1:])["sid"]}
    # the connect waits for the app's verdict in this request
    connecting = gevent.spawn(requests.post, url, params=params, data="40", timeout=15)
    wait_until(lambda: log, message="the connect handler never ran")
    sid = log[0][1]
    # the client closes its Engine.IO session while the app decides
    assert requests.post(url, params=params, data="1", timeout=5).status_code == 200
    release.set()                                    # the app says yes, too late
    connecting.join(15)
    wait_until(lambda: ("disconnect", sid) in log, message="the app never heard it left")
    keys = Keys(cluster.config.prefix)
    wait_until(lambda: ClusterState(redis_client, keys).count() == 0,
               message="the client's record stayed")
    assert io.clients == {} and not io.sio.manager.is_connected(sid, "/")
    assert log.count(("disconnect", sid)) == 1


# ---- taken messages are never stranded ---------------------------------------------------------

def test_messages_whose_give_back_failed_are_handled_once_redis_answers(cluster, redis_client):
    handled = []
    app = App()

    @app.on("rec")
    def rec(sid, n):
        handled.append(n)
        if n == 1:
            app.flush()          # a handler that waits gives back what waits behind it

    # no app-node yet: the connects are let in when no verdict comes, and the clients wait
    # in line, so the app-node's takes after its first (of one client: it has one worker)
    # hold several at once, client 1 first
    io = cluster.io_node(connect_timeout=0.3, connect_timeout_accept=True)
    for n in range(4):
        client = EventClient().connect_to(io)
        cluster.clients.append(client)
        client.sio.emit("rec", n)
    keys = Keys(cluster.config.prefix)
    wait_until(lambda: inbox_messages(redis_client, keys) == 8,
               message="connects and events not in the inbox")
    node = AppNode(app, cluster.config.replace(workers=1))
    cluster.app_nodes.append(node)
    give_back, failed = node.inbox.first.give_back, []

    def fails_once(*args, **kwargs):
        if not failed:
            failed.append(args)
            raise RedisConnectionError("injected: Redis went away during a give-back")
        return give_back(*args, **kwargs)

    node.inbox.first.give_back = fails_once
    # Redis has the inbox's scripts, as once any app-node ran: the first take is not given
    # back for want of them
    node.inbox.load_scripts()
    node.start()
    wait_until(lambda: sorted(set(handled)) == [0, 1, 2, 3], timeout=15,
               message=f"clients stranded in the processing list (handled {handled})")
    assert failed, "the injected failure never happened: the test proves nothing"
    wait_until(lambda: redis_client.llen(node.lanes[0].processing) == 0,
               message="the processing list kept clients")
    wait_until(lambda: inbox_messages(redis_client, keys) == 0,
               message="messages stayed in the queues")


def test_rooms_of_different_namespaces_never_share_a_key(cluster, redis_client):
    keys = Keys("p")
    assert keys.room("/a", "b:c") != keys.room("/a:b", "c")
    app = App()

    @app.on("join", namespace="*")
    def join(namespace, sid, room):
        app.enter_room(sid, room, namespace=namespace)
        return app.room_members(room, namespace=namespace)

    io = cluster.io_node()
    cluster.app_node(app)
    first = cluster.client(io, namespaces=["/a"])
    second = cluster.client(io, namespaces=["/a:b"])
    first_sid, second_sid = first.sio.get_sid("/a"), second.sio.get_sid("/a:b")
    assert first.call("join", "b:c", namespace="/a") == [[first_sid]]
    assert second.call("join", "c", namespace="/a:b") == [[second_sid]]


# ---- Redis and the io-node's memory stay bounded, in bytes as well as in messages -----------

def test_the_dead_letter_list_is_bounded_in_records_and_bytes(cluster, redis_client, caplog):
    app = App()
    handled = []

    @app.on("poison")
    def poison(sid, n, payload):
        handled.append(n)
        raise ValueError("cannot take it")

    io = cluster.io_node()
    cluster.app_node(app, max_attempts=1, dead_maxlen=3, dead_record_size=1_000, workers=1)
    client = cluster.client(io)
    with caplog.at_level(logging.WARNING):
        for n in range(6):
            client.sio.emit("poison", (n, "x" * 20_000))
        wait_until(lambda: len(handled) == 6, message="the poison messages were not handled")
        keys = Keys(cluster.config.prefix)
        wait_until(lambda: "oldest records dropped" in caplog.text,
                   message="no warning that dead letters were dropped")
    records = [json.loads(raw) for raw in redis_client.lrange(keys.dead, 0, -1)]
    assert len(records) == 3
    assert [r["cut"] for r in records] == [True] * 3
    assert all(len(raw) < 2_000 for raw in redis_client.lrange(keys.dead, 0, -1))
    assert all(r["raw_bytes"] > 20_000 for r in records)


def test_the_inbox_refuses_messages_past_its_size_in_bytes(cluster, redis_client):
    from siocluster.outbox import INBOX_FULL

    # no app-node: nothing drains the inbox; the connect is let in when no verdict comes
    io = cluster.io_node(inbox_max_bytes=20_000, connect_timeout=0.3,
                         connect_timeout_accept=True)
    client = cluster.client(io)
    answers = []
    for n in range(10):
        client.sio.emit("rec", "y" * 5_000, callback=lambda *a, n=n: answers.append((n, a)))
    wait_until(lambda: len(answers) >= 5, message="nothing was refused")
    assert all(a == ({"ok": False, "error": INBOX_FULL},) for _, a in answers)
    keys = Keys(cluster.config.prefix)
    messages, size = inbox_of(redis_client, keys).size()
    assert messages <= 4                                    # the connect and a few events
    # the bound counts the envelopes' bytes exactly
    queued = redis_client.lrange(keys.queue(client.sid), 0, -1)
    assert len(queued) == messages
    assert size == sum(len(raw.encode()) for raw in queued) <= 20_000


def test_the_outbox_refuses_messages_past_its_size_in_bytes_while_redis_is_away(
        durable_redis, own_cluster):
    from siocluster.outbox import OUTBOX_FULL

    io = own_cluster.io_node(outbox_size=1_000, outbox_max_bytes=12_000)
    own_cluster.app_node(readme_app([]), workers=1)
    client = own_cluster.client(io, auth={"name": "ann"})
    assert client.call("hello") == ["hi"]
    durable_redis.stop()
    answers = gevent.queue.Queue()
    for n in range(5):
        client.sio.emit("hello", "z" * 5_000, callback=lambda *a, n=n: answers.put((n, a)))
    refused = sorted(answers.get(timeout=5) for _ in range(3))
    assert refused == [(n, ({"ok": False, "error": OUTBOX_FULL},)) for n in (2, 3, 4)]
    assert io.outbox.bytes <= 12_000
    durable_redis.start()
    accepted = sorted(answers.get(timeout=20) for _ in range(2))
    assert accepted == [(0, ("hi",)), (1, ("hi",))]
    assert io.outbox.bytes == 0


# ---- one handler's commands are applied in the order it made them ---------------------------

def test_entries_of_both_streams_in_one_millisecond_apply_in_the_order_written(
        cluster, redis_client):
    from siocluster.envelope import emit_command, encode_batch

    io = cluster.io_node()
    cluster.app_node(readme_app([]))
    client = cluster.client(io, auth={"name": "ann"})
    keys = Keys(cluster.config.prefix)
    gate = hold_listener(io)        # so that one read finds the entries of both streams
    for n in range(3):
        # the same id in both streams, as two writes in one millisecond get; the sequence
        # number says the io-node's own stream was written first
        ms = 10**13 + n
        pipe = redis_client.pipeline(transaction=False)
        pipe.xadd(keys.commands, {"b": encode_batch([emit_command("n", [[n, "second"]], "/")]),
                                  "s": 2 * n + 2}, id=f"{ms}-0")
        pipe.xadd(keys.node_commands(io.id),
                  {"b": encode_batch([emit_command("n", [[n, "first"]], "/", to=client.sid)]),
                   "s": 2 * n + 1}, id=f"{ms}-0")
        pipe.execute()
    gate.set()
    got = [args[0] for args in client.expect("n", 6)]
    assert got == [[n, which] for n in range(3) for which in ("first", "second")]


def test_writes_are_numbered_and_split_where_the_kind_of_stream_changes(cluster, redis_client):
    from siocluster.streams import CommandStreams

    keys = Keys(cluster.config.prefix)
    streams = CommandStreams(redis_client, keys, maxlen=100)
    one = {"m": "app", "type": "x"}
    pipe = redis_client.pipeline(transaction=False)
    # handler A to io-node X's client, B to everyone, C to X again, D to io-node Y's client
    streams.write(pipe, [[("X", one)], [(None, one)], [("X", one)], [("Y", one)]])
    pipe.execute()

    def numbers(stream):
        return [int(fields["s"]) for _, fields in redis_client.xrange(stream)]

    x, shared, y = numbers(keys.node_commands("X")), numbers(keys.commands), \
        numbers(keys.node_commands("Y"))
    assert len(x) == 2 and len(shared) == 1 and len(y) == 1     # C did not join A's entry
    assert x[0] < shared[0] < x[1]
