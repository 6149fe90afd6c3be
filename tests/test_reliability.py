"""Delivery guarantees with nodes in this process: the reaper, retries and the dead-letter
list, backpressure, the outbox across a Redis outage, stream trimming, malformed data in
Redis, and graceful stops.

A node that "died" here is a registry entry whose heartbeat we let lapse, with the Redis
state a real node leaves behind; tests/test_faults.py kills real processes.
"""

import json
import time
import uuid

import gevent

from siocluster import App, AppNode, ClusterState, Keys
from siocluster.envelope import Envelope, encode_batch
from siocluster.reaper import DIED_REASON, Reaper, tombstone_key
from tests.helpers import wait_until


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

def test_reaper_returns_a_dead_app_nodes_messages_in_order_with_one_more_attempt(
        config, redis_client):
    keys = Keys(config.prefix)
    dead = dead_node(redis_client, keys, "app-node")
    queued = [event("s1", "rec", n) for n in range(4)]
    killer = event("s1", "rec", "killer", attempt=config.max_attempts - 1)
    # as BLMOVE leaves them: the newest popped at the left
    for raw in [e.encode() for e in queued] + [killer.encode(), "{not json"]:
        redis_client.lpush(keys.processing(dead), raw)

    log = []
    node = AppNode(recording_app(log), config.replace(workers=1)).start()
    try:
        wait_until(lambda: len(log) == 4, timeout=15, message="messages not handed over")
        assert log == [("rec", [n], 1) for n in range(4)]    # in order, one attempt more
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
        assert redis_client.exists(tombstone_key(keys, dead))
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
    messages = [event("s", "rec", n) for n in range(300)]
    redis_client.lpush(keys.processing(dead_app), *[m.encode() for m in messages])
    for n in range(300):
        state.add_client({"sid": f"c{n}", "namespace": "/", "node": dead_io, "info": {},
                          "connected_at": 0})
    nodes = [AppNode(App(), config), AppNode(App(), config)]
    reapers = [Reaper(node) for node in nodes]
    gevent.joinall([gevent.spawn(r.reap) for r in reapers], raise_error=True, timeout=30)
    inbox = [Envelope.decode(raw) for raw in redis_client.lrange(keys.inbox, 0, -1)]
    handed = sorted(e.id for e in inbox if e.kind == "event")
    disconnects = sorted(e.sid for e in inbox if e.kind == "disconnect")
    assert handed == sorted(m.id for m in messages)
    assert disconnects == sorted(f"c{n}" for n in range(300))
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
    # what the reaper leaves when it took the node for dead (and sent the disconnects itself)
    redis_client.set(tombstone_key(fenced.keys, fenced.id), "1")
    assert gone.wait(5), "the client of a node taken for dead stayed connected"
    wait_until(lambda: not redis_client.exists(tombstone_key(fenced.keys, fenced.id)),
               message="the node did not see its tombstone")
    assert fenced.clients == {}
    # barrier: anything the fenced node pushed before is handled by now
    assert other.call("rec", 2) == ["ok"]
    assert [entry for entry in log if entry[0] == "disconnect"] == []
    assert fenced.id in ClusterState(redis_client, fenced.keys).nodes()
