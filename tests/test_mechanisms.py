"""Ten mechanisms the README promises, each made to happen on purpose and checked.

Every test here sets up the one condition its mechanism exists for (a Redis call that
fails once, an entry placed by hand in a stream or a list, a limit set small, a clock
moved by hand) and fails when the mechanism is missing:

1. an io-node whose command-stream read failed resumes from the last id it applied;
2. the default origin check matches the io-node's host exactly, never by suffix;
3. ``MAX_MESSAGE_SIZE`` counts UTF-8 bytes, not characters;
4. a failed handler's retry stays first in its client's queue, and the client goes to the
   back of the line: other clients go first, the client's later messages wait behind it;
5. the reaper judges no node right after Redis came back (``grace``);
6. an ack past ``ACK_TIMEOUT`` is answered ``{ok: false}``, not dropped;
7. the two command streams an io-node reads are merged by entry id;
8. a connection's token bucket never holds more than ``RATE_BURST``;
9. an app-node gives back the clients its processing list holds and no worker does after
   a blip;
10. an app-node keeps a handled message's commands until Redis takes them.

Real redis-server, real io-nodes on loopback sockets, real python-socketio clients; where
a failure is needed it is injected by wrapping one Redis call of one node, and only the
token bucket's own unit test runs on a clock moved by hand.
"""

import time
import types
import uuid

import gevent.event
import pytest
import redis

from siocluster import App, AppNode, ioclient
from siocluster.envelope import Envelope, emit_command, encode_batch
from siocluster.ioclient import Client, same_host_origins
from siocluster.state import ClusterState, Keys
from tests.helpers import (
    enqueue,
    handshake,
    hold,
    hold_listener,
    inbox_messages,
    wait_until,
    websocket_handshake,
)

NO_ANSWER = "no answer from the app in time"
RATE_LIMITED = "rate limit exceeded, slow down"

pytestmark = pytest.mark.timeout(60)


def recording_app(log):
    """``rec`` records its argument and answers "ok"; ``flaky`` fails on its first try."""
    app = App()

    @app.on("rec")
    def rec(sid, data):
        log.append(("rec", data, app.delivery()[1]))
        return "ok"

    @app.on("flaky")
    def flaky(sid, data):
        attempt = app.delivery()[1]
        log.append(("flaky", data, attempt))
        if attempt == 0:
            raise ValueError("fails on its first try")
        return "ok"

    return app


def event(name, data, sid="s1", node="io-node-x"):
    """An event envelope as an io-node pushes it."""
    return Envelope("event", "/", sid, node, {"sid": sid}, event=name, args=[data])


def connected_client(cluster, log=None, **io_overrides):
    """An io-node, an app-node (so the connect gets its verdict) and a client of the node."""
    log = log if log is not None else []
    io = cluster.io_node(**io_overrides)
    cluster.app_node(recording_app(log))
    return io, cluster.client(io)


# ---- 1. a failed stream read resumes from the last id ------------------------------------

def test_a_failed_command_stream_read_resumes_from_the_last_id_applied(cluster, redis_client):
    io, client = connected_client(cluster)
    stream = io.keys.commands
    direct = io.readers[0].direct
    real_call = direct.call
    calls = []

    def call(*args):
        if args[0] != "XREAD":
            return real_call(*args)
        calls.append(args)
        if len(calls) == 1:
            # written while this node cannot read: it must get it once Redis answers again
            redis_client.xadd(stream, {"b": encode_batch(
                [emit_command("seq", ["during"], "/", to=client.sid)])})
            raise redis.exceptions.ConnectionError("injected: connection reset")
        return real_call(*args)

    direct.call = call
    wait_until(lambda: len(calls) >= 2, message="the io-node did not read again after the error")
    redis_client.xadd(stream, {"b": encode_batch(
        [emit_command("seq", ["after"], "/", to=client.sid)])})
    client.expect("seq", 2)
    assert client.received("seq") == [["during"], ["after"]]


# ---- 2. origins on the io-node's host, matched exactly -----------------------------------

def test_the_default_origin_check_matches_the_host_exactly_not_by_suffix():
    environ = {"HTTP_HOST": "example.com:8081"}
    assert same_host_origins("http://example.com", environ)
    assert same_host_origins("https://example.com:9000", environ)
    for origin in ("http://attacker-example.com", "http://evil.example.com",
                   "http://example.com.evil", "http://xexample.com:8081", "null"):
        assert not same_host_origins(origin, environ), origin
    proxied = {"HTTP_HOST": "127.0.0.1:8081", "HTTP_X_FORWARDED_HOST": "chat.example.com"}
    assert same_host_origins("https://chat.example.com", proxied)
    assert not same_host_origins("https://evilchat.example.com", proxied)


def test_a_handshake_from_a_host_that_only_ends_like_the_io_nodes_gets_a_400(cluster):
    io = cluster.io_node()

    def polling(origin):
        return handshake(io, origin, host="example.com").status_code

    def ws(origin):
        return websocket_handshake(io, origin, host="example.com")

    # the page's host is the io-node's, another port: let in
    assert polling("http://example.com:8080") == 200
    assert ws("http://example.com:8080") == 101
    # a host that merely ends like it: refused with a 400, both transports
    assert polling("http://attacker-example.com") == 400
    assert ws("http://attacker-example.com") == 400


# ---- 3. the size limit counts bytes --------------------------------------------------------

def test_max_message_size_counts_utf8_bytes_not_characters(cluster):
    log = []
    limit = 3000
    io, client = connected_client(cluster, log, max_message_size=limit)
    ascii_text, accented = "e" * 1500, "\u00e9" * 1500    # same length; twice the bytes
    # the control: as many characters, in ASCII, fit under the limit
    assert client.call("rec", ascii_text) == ["ok"]
    [answer] = client.call("rec", accented)
    assert isinstance(answer, dict) and answer["ok"] is False, answer
    size = int(answer["error"].split("message too large: ")[1].split(" bytes")[0])
    assert size > limit, answer
    assert answer["error"].endswith(f"the limit is {limit} bytes")
    assert [data for _, data, _ in log] == [ascii_text]


# ---- 4. a retry waits first in its client's queue, the client at the back of the line ------

def test_a_failed_handlers_retry_stays_first_in_its_queue_and_its_client_goes_to_the_back(
        cluster, config, redis_client):
    keys = Keys(config.prefix)
    log, in_line = [], gevent.event.Event()
    app = recording_app(log)

    @app.on("flaky")
    def flaky(sid, data):
        # recording_app's, its first try held until another client waits in line
        attempt = app.delivery()[1]
        log.append(("flaky", data, attempt))
        if attempt == 0:
            in_line.wait(5)
            raise ValueError("fails on its first try")
        return "ok"

    enqueue(redis_client, keys, event("flaky", "first", sid="s1"),
            event("rec", "second", sid="s1"))
    cluster.app_node(app, workers=1)
    wait_until(lambda: log, message="the first message was not handled")
    enqueue(redis_client, keys, event("rec", "third", sid="s2"))
    in_line.set()
    wait_until(lambda: len(log) == 4, message="the messages were not all handled")
    # the other client goes before the retry; s1's next message waits behind its retry
    assert log == [("flaky", "first", 0), ("rec", "third", 0), ("flaky", "first", 1),
                   ("rec", "second", 0)]
    assert inbox_messages(redis_client, keys) == 0 and redis_client.llen(keys.dead) == 0
    assert redis_client.llen(keys.ready) == 0 and not redis_client.keys(keys.queue_prefix + "*")


# ---- 5. the reaper waits after Redis came back ---------------------------------------------

def test_the_reaper_judges_no_node_right_after_redis_came_back(config, redis_client):
    keys = Keys(config.prefix)
    state = ClusterState(redis_client, keys)
    dead = f"app-node-quiet-{uuid.uuid4().hex[:6]}"
    state.heartbeat(dead, {"id": dead, "role": "app-node"}, 0.05)
    enqueue(redis_client, keys, event("rec", "held"))
    assert hold(redis_client, keys, keys.processing(dead)) == ["s1"]
    wait_until(lambda: not redis_client.exists(keys.alive(dead)), message="key did not expire")

    node = AppNode(recording_app([]), config)       # not started: its reaper is stepped here
    reaper = node.reaper
    try:
        # the Redis server itself has been up long enough: only the node's view matters
        wait_until(reaper.ready, timeout=reaper.grace + 5, interval=0.1,
                   message="the reaper never got ready")
        node.redis_up_since = time.time()          # its connection just came back
        assert reaper.step() == {}
        assert redis_client.hexists(keys.nodes, dead)
        assert redis_client.lrange(keys.processing(dead), 0, -1) == ["s1"]
        assert not redis_client.exists(keys.tombstone(dead))

        # the control: the same node, judged once the grace is over
        node.redis_up_since = time.time() - reaper.grace - 1
        assert reaper.step() == {"app-node": [dead]}
        assert not redis_client.hexists(keys.nodes, dead)
        assert redis_client.lrange(keys.ready, 0, -1) == ["s1"]     # handed back
    finally:
        node.redis.close()


# ---- 6. an ack past ACK_TIMEOUT ----------------------------------------------------------

def test_an_ack_past_ack_timeout_is_answered_not_ok_rather_than_dropped(cluster):
    # no app-node at all: the connect is let in when its verdict times out, and no event
    # is ever answered by the app tier
    io = cluster.io_node(ack_timeout=0.5, connect_timeout=0.3, connect_timeout_accept=True)
    client = cluster.client(io)
    answer = client.sio.call("anything", {"n": 1}, timeout=5)
    assert answer == {"ok": False, "error": NO_ANSWER}
    assert client.sio.connected


# ---- 7. the two command streams merged by id ----------------------------------------------

def test_the_two_command_streams_are_applied_in_entry_id_order(cluster, redis_client):
    io, client = connected_client(cluster)
    gate = hold_listener(io)        # so that one read finds every entry of both streams
    base = int(time.time() * 1000) + 60_000       # past anything either stream holds
    streams = [io.keys.commands, io.keys.node_commands(io.id)]
    for n in range(8):
        redis_client.xadd(streams[n % 2], {"b": encode_batch(
            [emit_command("seq", [n], "/", to=client.sid)])}, id=f"{base + n}-0")
    gate.set()
    client.expect("seq", 8)
    assert client.received("seq") == [[n] for n in range(8)]


# ---- 8. the token bucket is capped at RATE_BURST ------------------------------------------

def test_the_token_bucket_never_holds_more_than_the_burst(monkeypatch):
    clock = types.SimpleNamespace(now=1000.0)
    monkeypatch.setattr(ioclient, "time", types.SimpleNamespace(monotonic=lambda: clock.now))
    client = Client("sid", "/", "eio", {}, burst=3)

    def burst():
        taken = 0
        while client.take_token(rate=10, burst=3):
            taken += 1
            assert taken <= 1000, "the bucket never runs out"
        return taken

    assert burst() == 3                 # a new connection: a full bucket
    clock.now += 0.1
    assert burst() == 1                 # 10 a second: one more in 0.1 s
    clock.now += 3600                   # an hour idle: still no more than the burst
    assert burst() == 3


def test_an_idle_connection_still_gets_only_rate_burst_events_at_once(cluster):
    log = []
    io, client = connected_client(cluster, log, rate_limit=0.001, rate_burst=3)
    # an idle day, as the io-node's clock sees it: a bucket with no cap would be full to
    # the brim, at 0.001 a second a new token takes 1000 s
    io.clients[client.sid].stamp -= 24 * 3600
    answers = [client.call("rec", n) for n in range(6)]
    assert answers[:3] == [["ok"]] * 3
    assert answers[3:] == [[{"ok": False, "error": RATE_LIMITED}]] * 3
    assert [data for _, data, _ in log] == [0, 1, 2]
    assert client.sio.connected


# ---- 9. an app-node recovers its processing list after a Redis blip ------------------------

def test_an_app_node_gives_back_unheld_clients_of_its_processing_list_after_a_blip(
        cluster, redis_client):
    log = []
    node = AppNode(recording_app(log), cluster.config.replace(workers=2))
    cluster.app_nodes.append(node)
    # a take whose reply was lost with the connection: in the list, in no worker's hands
    enqueue(redis_client, node.keys, event("rec", "taken while Redis went away"))
    assert hold(redis_client, node.keys, node.lanes[0].processing) == ["s1"]
    node.start()
    node._redis_lost("worker-0", redis.exceptions.ConnectionError("injected"))
    node._redis_back()
    wait_until(lambda: log, message="the message left in the processing list was not handled")
    assert log == [("rec", "taken while Redis went away", 0)]
    wait_until(lambda: not redis_client.exists(node.lanes[0].processing),
               message="the processing list kept the client")
    wait_until(lambda: inbox_messages(redis_client, node.keys) == 0,
               message="the message stayed in its queue")


# ---- 10. a handled message's commands wait until Redis takes them --------------------------

def test_an_app_node_keeps_a_handled_messages_commands_until_redis_takes_them(cluster):
    log = []
    app = App()

    @app.on("work")
    def work(sid, data):
        log.append(data)
        app.emit("done", data, to=sid)
        return {"worked": data}

    io = cluster.io_node()
    node = cluster.app_node(app, workers=1)
    client = cluster.client(io)
    real_execute = node.committer.execute
    failed = []

    def execute(pipe):
        # the finish: the script on the ready list, this node's processing list and the
        # inbox's size
        finishing = any(c[0][0] == "EVALSHA" and c[0][3:6] == (
            node.keys.ready, node.lanes[0].processing, node.keys.inbox_size)
            for c in pipe.command_stack)
        if finishing and log and not failed:
            # the handler ran; Redis goes away before its commands are written
            failed.append(True)
            raise redis.exceptions.ConnectionError("injected: connection reset")
        return real_execute(pipe)

    node.committer.execute = execute
    assert client.call("work", 7) == [{"worked": 7}]
    assert failed, "the finish never failed: the test did not test anything"
    assert client.expect("done") == [[7]]
    assert log == [7]                   # the handler ran once: its commands were kept
    # nothing more arrives: a later round trip comes back alone
    assert client.call("work", 8) == [{"worked": 8}]
    assert client.expect("done", 2) == [[7], [8]]
    assert log == [7, 8]
