"""Delivery guarantees with nodes in this process: the reaper, retries and the dead-letter
list, backpressure, the outbox across a Redis outage, stream trimming, malformed data in
Redis, and graceful stops.

A node that "died" here is a registry entry whose heartbeat we let lapse, with the Redis
state a real node leaves behind; tests/test_faults.py kills real processes.
"""

import json
import logging
import pickle
import time
import uuid

import gevent
import gevent.event
import pytest
import redis
import socketio

from siocluster import App, AppNode, IoNode, RecoveringClient
from siocluster.envelope import Envelope, encode_batch
from siocluster.outbox import INBOX_FULL, OUTBOX_FULL
from siocluster.reaper import DIED_REASON, Reaper
from siocluster.state import ClusterState, Keys
from tests.helpers import EventClient, enqueue, enqueue_raw, hold, inbox_messages, wait_until


def recording_app(log):
    """An app that records (event, args, attempt) of each message, and a few that fail."""
    app = App()

    @app.on("rec")
    def rec(sid, *args):
        log.append(("rec", list(args), app.delivery()[1]))
        return "ok"

    @app.on("slow")
    def slow(sid, seconds):
        log.append(("slow-start", seconds, 0))
        gevent.sleep(seconds)
        log.append(("slow-end", seconds, 0))
        return "done"

    @app.on("fail")
    def fail(sid, data):
        message_id, attempt = app.delivery()
        log.append(("fail", message_id, attempt))
        raise ValueError(f"cannot take {data!r}")

    @app.on("bcast")
    def bcast(sid, data):
        app.emit("bcast", data)          # to everyone: through the stream every io-node reads

    @app.event
    def disconnect(sid, reason):
        log.append(("disconnect", sid, reason))

    return app


def wait_reaper_ready(node: AppNode):
    """The reaper waits until every live node could have heartbeated since Redis started."""
    reaper = node.reaper
    wait_until(reaper.ready, timeout=reaper.grace + 5, interval=0.1,
               message="the reaper never got ready")


def dead_node(redis_client, keys, role):
    """Register a node whose heartbeat lapses at once, as a killed node's does."""
    node = f"{role}-dead-{uuid.uuid4().hex[:6]}"
    ClusterState(redis_client, keys).heartbeat(node, {"id": node, "role": role}, 0.05)
    wait_until(lambda: not redis_client.exists(keys.alive(node)), message="key did not expire")
    return node


def event(sid, name, *args, attempt=0, node="io-node-x"):
    return Envelope("event", "/", sid, node, {"sid": sid}, event=name, args=list(args),
                    attempt=attempt)


# ---- the reaper ---------------------------------------------------------------------------

def test_reaper_returns_a_dead_app_nodes_clients_in_order_with_one_more_attempt(
        config, redis_client):
    keys = Keys(config.prefix)
    dead = dead_node(redis_client, keys, "app-node")
    # three clients the dead app-node took: one with four messages, one whose oldest was
    # tried all but once, one whose oldest is not an envelope at all
    queued = [event("s1", "rec", n) for n in range(4)]
    killer = event("s2", "rec", "killer", attempt=config.max_attempts - 1)
    enqueue(redis_client, keys, *queued, killer, event("s2", "rec", "after the killer"))
    enqueue_raw(redis_client, keys, "s3", "{not json")
    enqueue(redis_client, keys, event("s3", "rec", "after the garbage"))
    assert hold(redis_client, keys, keys.processing(dead)) == ["s1", "s2", "s3"]

    log = []
    node = AppNode(recording_app(log), config.replace(workers=1)).start()
    try:
        wait_until(lambda: len(log) == 6, timeout=15, message="messages not handed over")
        # in order; the oldest message of each client handed back with one attempt more
        assert [entry for entry in log if isinstance(entry[1][0], int)] == [
            ("rec", [0], 1), ("rec", [1], 0), ("rec", [2], 0), ("rec", [3], 0)]
        assert sorted(entry for entry in log if isinstance(entry[1][0], str)) == [
            ("rec", ["after the garbage"], 0), ("rec", ["after the killer"], 0)]
        dead_letters = [json.loads(r) for r in redis_client.lrange(keys.dead, 0, -1)]
        errors = sorted(d["error"] for d in dead_letters)
        assert errors[0].startswith("app-node " + dead) and "died while handling it" in errors[0]
        assert errors[1].startswith("malformed")
        killed = next(d for d in dead_letters if "died" in d["error"])
        assert Envelope.decode(killed["raw"]).id == killer.id
        assert killed["attempts"] == config.max_attempts
        wait_until(lambda: not redis_client.hexists(keys.nodes, dead),
                   message="the dead node's registry entry stayed")
        assert not redis_client.exists(keys.processing(dead))
        wait_until(lambda: inbox_messages(redis_client, keys) == 0,
                   message="messages stayed in the queues")
        assert redis_client.exists(keys.tombstone(dead))
        assert redis_client.hexists(keys.nodes, node.id)     # the reaper's own node stays
    finally:
        node.stop(timeout=3)


def test_reaper_disconnects_every_client_of_a_dead_io_node(cluster, config, redis_client):
    keys = Keys(config.prefix)
    state = ClusterState(redis_client, keys)
    dead = dead_node(redis_client, keys, "io-node")
    redis_client.xadd(keys.node_commands(dead), {"b": encode_batch([])})
    sids = [f"sid-{n}" for n in range(250)]
    for sid in sids:
        state.add_client({"sid": sid, "namespace": "/", "node": dead, "info": {"n": sid},
                          "connected_at": time.time()})
        state.enter_room(sid, "/", "lobby")
    log = []
    node = cluster.app_node(recording_app(log))
    wait_until(lambda: len(log) == len(sids), timeout=15, message="disconnects not delivered")
    assert sorted(log) == sorted(("disconnect", sid, DIED_REASON) for sid in sids)
    wait_until(lambda: state.count() == 0, message="client records stayed")
    assert state.room_members("/", "lobby") == []
    assert not redis_client.exists(keys.node_clients(dead))
    assert not redis_client.exists(keys.node_commands(dead))
    wait_until(lambda: not redis_client.hexists(keys.nodes, dead), message="registry entry stayed")
    assert node.reaper.grace <= config.node_ttl + 2 * config.heartbeat_interval + 5


def test_two_reapers_at_once_never_hand_over_a_message_or_a_client_twice(config, redis_client):
    keys = Keys(config.prefix)
    state = ClusterState(redis_client, keys)
    dead_app = dead_node(redis_client, keys, "app-node")
    dead_io = dead_node(redis_client, keys, "io-node")
    # 100 clients of three messages each, taken by the dead app-node
    messages = [event(f"s{n % 100}", "rec", n) for n in range(300)]
    enqueue(redis_client, keys, *messages)
    assert len(hold(redis_client, keys, keys.processing(dead_app))) == 100
    for n in range(300):
        state.add_client({"sid": f"c{n}", "namespace": "/", "node": dead_io, "info": {},
                          "connected_at": 0})
    nodes = [AppNode(App(), config), AppNode(App(), config)]
    reapers = [Reaper(node) for node in nodes]
    gevent.joinall([gevent.spawn(r.reap) for r in reapers], raise_error=True, timeout=30)
    # one token for each client, in the ready list: none handed over twice
    assert sorted(redis_client.lrange(keys.ready, 0, -1)) == sorted(
        [f"s{n}" for n in range(100)] + [f"c{n}" for n in range(300)])
    queues = {sid: [Envelope.decode(raw) for raw in reversed(
        redis_client.lrange(keys.queue(sid), 0, -1))] for sid in redis_client.lrange(
        keys.ready, 0, -1)}
    handed = sorted(e.id for queue in queues.values() for e in queue if e.kind == "event")
    assert handed == sorted(m.id for m in messages)
    # each client's oldest message one attempt more, once
    assert {sid: [e.attempt for e in queue] for sid, queue in queues.items()
            if sid.startswith("s")} == {f"s{n}": [1, 0, 0] for n in range(100)}
    disconnects = [e.sid for queue in queues.values() for e in queue if e.kind == "disconnect"]
    assert sorted(disconnects) == sorted(f"c{n}" for n in range(300))
    assert inbox_messages(redis_client, keys) == 600
    assert state.nodes(alive=None) == {}


def test_a_node_taken_for_dead_closes_its_connections_when_it_comes_back(cluster, config,
                                                                          redis_client):
    log = []
    app = recording_app(log)
    fenced, other_io = cluster.io_node(), cluster.io_node()
    cluster.app_node(app)
    client, other = cluster.client(fenced), cluster.client(other_io)
    assert client.call("rec", 1) == ["ok"]
    gone = gevent.event.Event()
    client.sio.on("disconnect", lambda *reason: gone.set())
    # what the reaper leaves when it took the node for dead (and sent the disconnects itself,
    # taking each client out of the node's set as it did)
    redis_client.delete(fenced.keys.node_clients(fenced.id))
    redis_client.set(fenced.keys.tombstone(fenced.id), "1")
    assert gone.wait(5), "the client of a node taken for dead stayed connected"
    wait_until(lambda: not redis_client.exists(fenced.keys.tombstone(fenced.id)),
               message="the node did not see its tombstone")
    assert fenced.clients == {}
    # barrier: anything the fenced node pushed before is handled by now
    assert other.call("rec", 2) == ["ok"]
    assert [entry for entry in log if entry[0] == "disconnect"] == []
    assert fenced.id in ClusterState(redis_client, fenced.keys).nodes()


def test_a_client_the_reaper_did_not_know_of_gets_its_disconnect_once(cluster, redis_client):
    """A client that connected while its io-node was cut off is not in what the reaper saw:
    the io-node, back, tells the app tier itself; one the reaper handled is not told twice."""
    log = []
    app = recording_app(log)
    fenced, other_io = cluster.io_node(), cluster.io_node()
    cluster.app_node(app)
    known, unknown = cluster.client(fenced), cluster.client(fenced)
    other = cluster.client(other_io)
    assert known.call("rec", 1) == ["ok"] and unknown.call("rec", 1) == ["ok"]
    known_sid, unknown_sid = known.sid, unknown.sid
    # the reaper handled `known` only: out of the node's set, its disconnect pushed
    redis_client.srem(fenced.keys.node_clients(fenced.id), known_sid)
    redis_client.set(fenced.keys.tombstone(fenced.id), "1")
    wait_until(lambda: fenced.clients == {}, message="the fenced node kept its clients")
    wait_until(lambda: any(e[:2] == ("disconnect", unknown_sid) for e in log),
               message="the app never heard that the unknown client left")
    assert other.call("rec", 2) == ["ok"]        # barrier
    assert [e[1] for e in log if e[0] == "disconnect"] == [unknown_sid]
    assert redis_client.scard(fenced.keys.node_clients(fenced.id)) == 0


def test_a_poison_message_ends_in_the_dead_letter_list_and_the_rest_keeps_flowing(cluster,
                                                                                  redis_client):
    log = []
    io = cluster.io_node()
    node = cluster.app_node(recording_app(log), max_attempts=3)
    client = cluster.client(io)
    client.sio.emit("fail", "poison")
    for n in range(5):
        assert client.call("rec", n) == ["ok"]
    wait_until(lambda: redis_client.llen(node.keys.dead) == 1, message="not dead-lettered")
    dead = json.loads(redis_client.lindex(node.keys.dead, 0))
    assert dead["error"] == "ValueError: cannot take 'poison'"
    assert Envelope.decode(dead["raw"]).attempt == 3
    tries = [(message_id, attempt) for kind, message_id, attempt in log if kind == "fail"]
    assert [attempt for _, attempt in tries] == [0, 1, 2]
    assert len({message_id for message_id, _ in tries}) == 1     # one message, three deliveries
    assert [args for kind, args, _ in log if kind == "rec"] == [[n] for n in range(5)]
    assert redis_client.llen(node.lanes[0].processing) == 0


# ---- backpressure and outages ---------------------------------------------------------------

def test_a_full_inbox_refuses_events_and_connects_but_never_a_disconnect(cluster, config,
                                                                        redis_client):
    keys = Keys(config.prefix)
    # no app-node yet: nothing drains the inbox; the connect is let in when no verdict comes
    io = cluster.io_node(inbox_maxlen=5, connect_timeout=0.5, connect_timeout_accept=True)
    client = cluster.client(io)
    assert inbox_messages(redis_client, keys) == 1             # its connect
    answers = gevent.queue.Queue()
    for n in range(10):
        client.sio.emit("rec", n, callback=lambda *a, n=n: answers.put((n, list(a))))
    refused = sorted(answers.get(timeout=5) for _ in range(6))
    assert refused == [(n, [{"ok": False, "error": INBOX_FULL}]) for n in range(4, 10)]
    assert [args[0]["error"] for args in client.expect("error", 6)] == [INBOX_FULL] * 6
    assert inbox_messages(redis_client, keys) == 5

    late = EventClient()
    refusal = gevent.event.AsyncResult()
    late.sio.on("connect_error", refusal.set)
    with pytest.raises(socketio.exceptions.ConnectionError):
        late.connect_to(io)
    assert refusal.get(timeout=1) == {"message": INBOX_FULL}
    wait_until(lambda: ClusterState(redis_client, keys).count() == 1,
               message="the refused client's record stayed")
    client.close()
    wait_until(lambda: inbox_messages(redis_client, keys) == 6,
               message="the disconnect was refused")

    log = []
    cluster.app_node(recording_app(log), workers=1)
    wait_until(lambda: len(log) == 5, message="the accepted messages were not handled")
    assert log[:4] == [("rec", [n], 0) for n in range(4)]
    assert log[4][0] == "disconnect"
    assert answers.empty()      # the accepted ones were answered to a client that left


def test_events_wait_in_the_outbox_while_redis_is_down_and_past_its_bound_are_refused(
        durable_redis, own_cluster):
    log = []
    io = own_cluster.io_node(outbox_size=5)
    own_cluster.app_node(recording_app(log), workers=1)
    client = own_cluster.client(io)
    assert client.call("rec", "before") == ["ok"]

    durable_redis.stop()
    answers = gevent.queue.Queue()
    for n in range(8):
        client.sio.emit("rec", n, callback=lambda *a, n=n: answers.put((n, list(a))))
    refused = sorted(answers.get(timeout=5) for _ in range(3))
    assert refused == [(n, [{"ok": False, "error": OUTBOX_FULL}]) for n in (5, 6, 7)]
    assert client.expect("error", 3)[0] == [{"event": "rec", "error": OUTBOX_FULL}]

    durable_redis.start()
    accepted = sorted(answers.get(timeout=20) for _ in range(5))
    assert accepted == [(n, ["ok"]) for n in range(5)]
    assert [args for kind, args, _ in log if kind == "rec"] == [["before"]] + [[n] for n in
                                                                             range(5)]
    assert client.call("rec", "after") == ["ok"]


def test_commands_trimmed_before_an_io_node_read_them_are_reported(config, redis_client,
                                                                   caplog):
    io = IoNode(config.replace(stream_maxlen=50))    # its listener is stepped by hand here
    stream = io.keys.commands
    redis_client.xadd(stream, {"b": encode_batch([])})
    io.readers[0].last_ids = {stream: None}
    io.readers[0].last_ids[stream], io.readers[0].seq[stream] = io.readers[0].tip(stream)

    def write(count):
        for _ in range(count):
            redis_client.xadd(stream, {"b": encode_batch([{"m": "app", "type": "x"}])},
                              maxlen=50, approximate=False)

    try:
        with caplog.at_level(logging.WARNING, logger="siocluster.io-node"):
            write(40)                  # an outage the stream's retention covers
            io.readers[0].check_due = True
            io._listen_step(io.readers[0])
            assert "trimmed" not in caplog.text
            write(300)                 # a longer one: only the last 50 are kept
            io.readers[0].check_due = True
            io._listen_step(io.readers[0])
        assert "250 command batch(es)" in caplog.text and "STREAM_MAXLEN" in caplog.text
        assert io.readers[0].last_ids[stream] == redis_client.xrevrange(stream, count=1)[0][0]
    finally:
        io.redis.close()


# ---- bad data in Redis -----------------------------------------------------------------------

def test_malformed_data_in_redis_is_logged_and_skipped(cluster, config, redis_client, caplog):
    log = []
    io = cluster.io_node()
    node = cluster.app_node(recording_app(log), workers=1)
    client = cluster.client(io)
    keys = node.keys
    valid = json.loads(event(client.sid, "rec", 1).encode())
    garbage = [b"", b"not json", b"[1, 2]", b'{"v": 99}', pickle.dumps({"a": 1}),
               b"\xff\xfe\x00 not utf-8",
               json.dumps({**valid, "attempt": "x"}).encode(),
               json.dumps({**valid, "args": {"not": "a list"}}).encode(),
               json.dumps({**valid, "kind": "explode"}).encode()]
    raw_client = redis.Redis.from_url(config.redis_url)      # bytes as they are
    try:
        with caplog.at_level(logging.ERROR):
            # in the client's own queue: its next event waits behind them
            enqueue_raw(raw_client, keys, client.sid, *garbage)
            assert client.call("rec", "after") == ["ok"]
            wait_until(lambda: redis_client.llen(keys.dead) == len(garbage),
                       message="not every malformed message was set aside")
            assert redis_client.llen(node.lanes[0].processing) == 0
            dead = [json.loads(r) for r in redis_client.lrange(keys.dead, 0, -1)]
            assert all(d["error"].startswith("malformed") for d in dead)

            bad_entries = [{"x": "no batch"}, {"b": "not json"}, {"b": b"\xff\xfe"},
                           {"b": encode_batch([{"m": "launch"}])},
                           {"b": encode_batch([{"m": "emit", "ns": "/"}])},
                           {"b": encode_batch([{"m": "emit", "ns": "/", "event": "e",
                                                "args": "not a list"}])}]
            for fields in bad_entries:
                raw_client.xadd(keys.commands, fields)
                raw_client.xadd(keys.node_commands(io.id), fields)
            client.sio.emit("bcast", "through the stream")
            assert client.expect("bcast") == [["through the stream"]]
            assert client.call("rec", "through the node's own stream") == ["ok"]
        skipped = caplog.text.count("skipped malformed command entry")
        failed = caplog.text.count("failed")
        assert skipped + failed >= 2 * len(bad_entries) and skipped >= 2 * 4
        assert all(not g.dead for g in node._greenlets + io._greenlets)
    finally:
        raw_client.close()


# ---- graceful stops -------------------------------------------------------------------------

def test_a_stopping_app_node_finishes_its_messages_and_takes_no_new_ones(cluster, config,
                                                                         redis_client):
    log = []
    io = cluster.io_node()
    node = cluster.app_node(recording_app(log), workers=2)
    # two clients: one client's messages are handled one at a time
    clients = [cluster.client(io), cluster.client(io)]
    answers = gevent.queue.Queue()
    for client in clients:
        for _n in range(2):
            client.sio.emit("slow", 0.5, callback=lambda *a: answers.put(a))
    wait_until(lambda: len(log) == 2, message="the slow handlers did not start")
    node.stop(timeout=5)
    assert [kind for kind, _, _ in log] == ["slow-start"] * 2 + ["slow-end"] * 2
    assert inbox_messages(redis_client, node.keys) == 2     # left for other app-nodes
    assert not redis_client.exists(node.lanes[0].processing)
    assert node.id not in ClusterState(redis_client, node.keys).nodes(alive=None)
    cluster.app_node(recording_app(log), workers=2)
    assert [answers.get(timeout=5) for _ in range(4)] == [("done",)] * 4


def test_a_handler_still_running_when_the_stop_times_out_is_given_back(cluster, config,
                                                                       redis_client):
    log = []
    io = cluster.io_node()
    node = cluster.app_node(recording_app(log), workers=1)
    client = cluster.client(io)
    client.sio.emit("slow", 30)
    wait_until(lambda: log, message="the slow handler did not start")
    node.stop(timeout=0.5)
    assert [kind for kind, _, _ in log] == ["slow-start"]
    returned = Envelope.decode(redis_client.lindex(node.keys.queue(client.sid), -1))
    assert (returned.event, returned.attempt) == ("slow", 1)
    assert redis_client.lrange(node.keys.ready, 0, -1) == [client.sid]
    assert not redis_client.exists(node.lanes[0].processing)


# python-engineio's client drops its HTTP session unclosed each time a polling attempt fails
# (here: while the io-node drains, and until its successor listens)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_stopping_io_node_drops_its_connections_and_its_clients_come_back_as_themselves(
        cluster, config, redis_client):
    """A rolling deploy: the io-node stops, a successor starts on its address, and its
    clients (websocket and polling) come back with their sids, recovered, the app having
    heard no disconnect."""
    log = []
    io = cluster.io_node()
    port = io.address[1]
    cluster.app_node(recording_app(log))
    clients, reasons = {}, gevent.queue.Queue()
    for transport in ("websocket", "polling"):
        client = RecoveringClient(reconnection=True, reconnection_delay=0.1,
                                  reconnection_delay_max=0.3)
        client.on("disconnect", lambda *reason, t=transport: reasons.put((t, reason)))
        client.connect(f"http://127.0.0.1:{port}", transports=[transport], wait_timeout=5)
        clients[transport] = client
    old_sids = {t: c.get_sid() for t, c in clients.items()}
    first_ws = clients["websocket"].eio.ws     # python-socketio leaves it open after a drop
    try:
        io.stop()
        # a dropped connection, not a Socket.IO disconnect: clients reconnect by themselves
        assert sorted(reasons.get(timeout=5) for _ in clients) == [
            ("polling", ("transport error",)), ("websocket", ("transport error",))]
        assert io.id not in ClusterState(redis_client, io.keys).nodes(alive=None)
        assert not redis_client.exists(io.keys.node_commands(io.id))
        # parked, not gone: the app hears of no disconnect
        assert redis_client.zcard(io.keys.parked) == 2
        assert log == []

        # here to a new io-node on the same address (python-socketio's polling client takes
        # a ping interval to notice; browsers reconnect at once)
        successor = IoNode(config).start()
        cluster.io_nodes.append(successor)
        successor.start_server(("127.0.0.1", port))
        for transport, client in clients.items():
            wait_until(lambda c=client: c.connected and c.recovered.get("/"), timeout=10,
                       message=f"the {transport} client did not come back as itself")
            assert client.get_sid() == old_sids[transport]
            assert client.call("rec", "back", timeout=5) == "ok"
        assert [r["node"] for r in ClusterState(redis_client, io.keys).clients()] == [
            successor.id] * 2
        assert "disconnect" not in [kind for kind, _, _ in log]
        assert redis_client.zcard(io.keys.parked) == 0
    finally:
        for client in clients.values():
            client.disconnect()
            if client.eio.http is not None:     # the polling client still on its way down
                client.eio.http.close()
        first_ws.shutdown()
