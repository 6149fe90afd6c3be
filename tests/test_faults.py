"""Fault injection with real processes: io-nodes and app-nodes run as subprocesses
(`python -m siocluster.ionode` / `siocluster.appnode`), get SIGKILL or SIGTERM, and
redis-server is restarted under them. The apps are in tests/fault_apps.py and record what
they handled in Redis; the tests count.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import gevent
import gevent.event
import gevent.queue
import pytest
import redis

from siocluster.reaper import DIED_REASON
from siocluster.state import ClusterState, Keys
from tests.helpers import EventClient, free_port, inbox_messages, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# generous next to the 0.3 s of the in-process tests: these processes share a loaded machine
FAST = {"SIOCLUSTER_HEARTBEAT_INTERVAL": "0.5", "SIOCLUSTER_NODE_TTL": "3"}


class Nodes:
    """Node subprocesses of one cluster (its own key prefix), with their logs in files."""

    def __init__(self, redis_url, log_dir, **settings):
        self.prefix = f"fault-{uuid.uuid4().hex[:8]}"
        self.env = dict(os.environ, PYTHONPATH=ROOT, SIOCLUSTER_REDIS_URL=redis_url,
                        SIOCLUSTER_PREFIX=self.prefix, SIOCLUSTER_RATE_LIMIT="0",
                        SIOCLUSTER_POP_TIMEOUT="0.2", **settings)
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self.keys = Keys(self.prefix)
        self.state = ClusterState(self.redis, self.keys)
        self.log_dir = log_dir
        self.procs = []

    def key(self, *parts):
        """A key the apps of tests/fault_apps.py write (``app.key(...)``)."""
        return ":".join((self.prefix, "app", *parts))

    def _start(self, name, args, **settings):
        # the log outlives this call: closed in close()
        log = open(os.path.join(self.log_dir, f"{name}-{len(self.procs)}.log"), "w")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT,
                                env=dict(self.env, **settings), stdout=log,
                                stderr=subprocess.STDOUT)
        proc.log = log
        self.procs.append(proc)
        return proc

    def io_node(self, **settings):
        port = free_port()
        proc = self._start("io-node", ["siocluster.ionode", "--port", str(port)], **settings)
        proc.port = port
        return proc

    def app_node(self, app, **settings):
        return self._start("app-node", ["siocluster.appnode", f"tests.fault_apps:{app}"],
                           **settings)

    def node_id(self, proc):
        return next(n for n in self.state.nodes(alive=None) if f"-{proc.pid}-" in n)

    def wait_registered(self, *procs):
        """Until every node is in the registry, and every io-node listens."""
        def up():
            ids = " ".join(self.state.nodes())
            return all(f"-{p.pid}-" in ids and (not hasattr(p, "port") or _listening(p.port))
                       for p in procs)
        wait_until(lambda: self._alive(procs) and up(), timeout=30, interval=0.1,
                   message="nodes did not register")

    def _alive(self, procs):
        for proc in procs:
            assert proc.poll() is None, f"{proc.args} exited:\n{self.output(proc)}"
        return True

    def output(self, proc):
        proc.log.flush()
        with open(proc.log.name) as f:
            return f.read()

    def stop(self, proc, sig=signal.SIGTERM, timeout=15):
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{proc.args} did not stop on {sig!r}:\n{self.output(proc)}")

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.log.close()
        self.redis.close()


@pytest.fixture
def nodes_factory(tmp_path):
    made = []

    def make(redis_url, **settings):
        made.append(Nodes(redis_url, str(tmp_path), **settings))
        return made[-1]

    yield make
    for nodes in made:
        nodes.close()


def _listening(port):
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def connect(proc, **kwargs):
    client = EventClient(**kwargs)
    client.sio.connect(f"http://127.0.0.1:{proc.port}", transports=["websocket"],
                       wait_timeout=10)
    return client


# ---- app-nodes -----------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_of_an_app_node_in_a_burst_of_10000_loses_no_message(redis_server,
                                                                      nodes_factory):
    nodes = nodes_factory(redis_server.url, **FAST)
    io = nodes.io_node()
    victim, survivor = nodes.app_node("burst"), nodes.app_node("burst")
    nodes.wait_registered(io, victim, survivor)
    victim_id = nodes.node_id(victim)
    clients = [connect(io) for _ in range(10)]
    total = 10_000

    def send(offset):
        for n in range(offset, total, len(clients)):
            clients[offset].sio.emit("n", n)
            if n % 50 == offset:
                gevent.sleep(0)

    started = time.monotonic()
    senders = [gevent.spawn(send, k) for k in range(len(clients))]
    seen = nodes.key("seen")
    wait_until(lambda: nodes.redis.scard(seen) >= total // 4, timeout=30, interval=0.01,
               message="the burst did not get going")
    victim.kill()
    victim.wait()
    killed_at = nodes.redis.scard(seen)
    in_flight = nodes.redis.llen(nodes.keys.processing(victim_id))
    gevent.joinall(senders, timeout=60, raise_error=True)
    wait_until(lambda: nodes.redis.scard(seen) == total, timeout=60, interval=0.1,
               message="not every message was handled")
    elapsed = time.monotonic() - started
    handled = int(nodes.redis.get(nodes.key("handled")))
    wait_until(lambda: victim_id not in nodes.state.nodes(alive=None), timeout=15,
               message="the dead app-node was not cleaned up")
    assert in_flight > 0, "the victim held no client when killed: nothing was tested"
    assert not nodes.redis.exists(nodes.keys.processing(victim_id))
    assert nodes.redis.llen(nodes.keys.dead) == 0
    print(f"\n10,000 messages, app-node SIGKILLed after {killed_at} with {in_flight} client(s) "
          f"in flight: all handled in {elapsed:.1f}s, {handled - total} handled twice")
    for client in clients:
        client.close()


@pytest.mark.slow
def test_a_message_that_kills_its_app_node_ends_in_the_dead_letter_list(redis_server,
                                                                        nodes_factory):
    nodes = nodes_factory(redis_server.url, SIOCLUSTER_MAX_ATTEMPTS="2", **FAST)
    io = nodes.io_node()
    apps = [nodes.app_node("poison", SIOCLUSTER_WORKERS="1") for _ in range(3)]
    nodes.wait_registered(io, *apps)
    client = connect(io)
    client.sio.emit("eat", "poison")
    for food in ("bread", "cheese", "apple"):
        client.sio.emit("eat", food)
    wait_until(lambda: nodes.redis.llen(nodes.keys.dead) == 1, timeout=40, interval=0.1,
               message="the poison was not dead-lettered")
    dead = json.loads(nodes.redis.lindex(nodes.keys.dead, 0))
    assert "died while handling it" in dead["error"]
    assert dead["attempts"] == 2
    assert json.loads(dead["raw"])["args"] == ["poison"]
    assert sorted(p.poll() for p in apps if p.poll() is not None) == [17, 17]
    wait_until(lambda: set(nodes.redis.lrange(nodes.key("ate"), 0, -1)) == {
        "bread", "cheese", "apple"}, timeout=20, message="the rest of the queue stalled")
    assert client.call("eat", "pie", timeout=10) == ["pie"]       # and keeps flowing
    client.close()


def test_sigterm_on_an_app_node_finishes_its_messages_and_takes_no_new_ones(redis_server,
                                                                           nodes_factory):
    nodes = nodes_factory(redis_server.url, **FAST)
    io = nodes.io_node()
    app = nodes.app_node("chat", SIOCLUSTER_WORKERS="2")
    nodes.wait_registered(io, app)
    # three clients of two events each: a client's events run one at a time, so the two
    # workers hold two clients
    clients = [connect(io) for _ in range(3)]
    answers = gevent.queue.Queue()
    for k, client in enumerate(clients):
        for n in (2 * k, 2 * k + 1):
            client.sio.emit("slow", n, callback=lambda n, k=k: answers.put((k, n)))
    started = nodes.key("started")
    wait_until(lambda: nodes.redis.llen(started) == 2, timeout=10, message="not started")
    t0 = time.monotonic()
    assert nodes.stop(app) == 0
    drained_in = time.monotonic() - t0
    assert sorted(nodes.redis.lrange(nodes.key("finished"), 0, -1)) == sorted(
        nodes.redis.lrange(started, 0, -1))
    assert nodes.redis.llen(started) == 2                      # took no new ones
    assert len({int(n) // 2 for n in nodes.redis.lrange(started, 0, -1)}) == 2
    assert inbox_messages(nodes.redis, nodes.keys) == 4        # left for others
    assert "finishing 2 client turn(s) in flight" in nodes.output(app)
    assert not nodes.state.nodes(role="app-node", alive=None)  # deregistered
    nodes.app_node("chat", SIOCLUSTER_WORKERS="4")
    got = [answers.get(timeout=20) for _ in range(6)]
    assert sorted(n for _, n in got) == list(range(6))
    for k in range(3):          # each client's answers in the order it sent its events
        assert [n for sender, n in got if sender == k] == [2 * k, 2 * k + 1]
    print(f"\napp-node drained 2 in-flight client turns in {drained_in:.1f}s after SIGTERM")
    for client in clients:
        client.close()


# ---- io-nodes ------------------------------------------------------------------------------

def _lobby(nodes, proc, count):
    clients = []
    for _ in range(count):
        client = connect(proc)
        assert client.call("join", "lobby", timeout=10) == ["joined"]
        clients.append(client)
    return clients


@pytest.mark.slow
@pytest.mark.parametrize("window", [0, 3])
def test_sigkill_of_an_io_node_disconnects_its_clients_within_the_default_bound(
        redis_server, nodes_factory, window):
    """With recovery off, at once; with it, once the window closes for clients that did
    not come back (these do not: their io-node is gone and they know no other)."""
    # the default heartbeat and node_ttl
    nodes = nodes_factory(redis_server.url, SIOCLUSTER_RECOVERY_WINDOW=str(window))
    victim, other = nodes.io_node(), nodes.io_node()
    app = nodes.app_node("chat")
    nodes.wait_registered(victim, other, app)
    victim_id = nodes.node_id(victim)
    doomed = _lobby(nodes, victim, 3)
    [observer] = _lobby(nodes, other, 1)
    doomed_sids = sorted(c.sid for c in doomed)
    # the reaper judges no one until every live node could have heartbeated since Redis
    # started (it would take a restarted Redis for all of them dead)
    grace = 10
    wait_until(lambda: nodes.redis.info("server")["uptime_in_seconds"] >= grace, timeout=15,
               interval=0.2, message="redis-server too young")

    victim.kill()
    killed = time.time()
    victim.wait()
    left = observer.expect("left", 3, timeout=20)
    assert sorted(args[0] for args in left) == doomed_sids
    records = [json.loads(r) for r in nodes.redis.lrange(nodes.key("left"), 0, -1)]
    assert sorted(r["sid"] for r in records) == doomed_sids
    assert {r["reason"] for r in records} == {DIED_REASON}
    delay = max(r["at"] for r in records) - killed
    print(f"\nio-node SIGKILLed: the app had the disconnects of its 3 clients {delay:.1f}s "
          f"later (default node_ttl 10s, heartbeat 2s, recovery window {window}s)")
    assert window <= delay <= 15 + window
    wait_until(lambda: nodes.state.room_members("/", "lobby") == [observer.sid],
               message="the dead node's clients stayed in the room")
    assert [c["sid"] for c in nodes.state.clients()] == [observer.sid]
    wait_until(lambda: victim_id not in nodes.state.nodes(alive=None),
               message="the dead io-node stayed registered")
    assert not nodes.redis.exists(nodes.keys.node_commands(victim_id))
    assert not nodes.redis.exists(nodes.keys.node_clients(victim_id))
    for client in doomed + [observer]:
        client.close()


def test_sigterm_on_an_io_node_drops_its_clients_and_the_app_hears_of_each(redis_server,
                                                                           nodes_factory):
    """With recovery off (tests/test_recovery.py has its clients come back as themselves)."""
    nodes = nodes_factory(redis_server.url, SIOCLUSTER_RECOVERY_WINDOW="0", **FAST)
    io = nodes.io_node()
    app = nodes.app_node("chat")
    nodes.wait_registered(io, app)
    io_id = nodes.node_id(io)
    clients = _lobby(nodes, io, 3)
    sids = sorted(c.sid for c in clients)
    reasons = gevent.queue.Queue()
    for client in clients:
        client.sio.on("disconnect", lambda *reason: reasons.put(reason))
    assert nodes.stop(io) == 0
    # dropped, not told to go away: clients reconnect by themselves
    assert [reasons.get(timeout=5) for _ in clients] == [("transport error",)] * 3
    wait_until(lambda: nodes.redis.llen(nodes.key("left")) == 3, timeout=10,
               message="the app did not get the disconnects")
    records = [json.loads(r) for r in nodes.redis.lrange(nodes.key("left"), 0, -1)]
    assert sorted(r["sid"] for r in records) == sids
    assert DIED_REASON not in {r["reason"] for r in records}    # the node said so itself
    assert io_id not in nodes.state.nodes(alive=None)
    wait_until(lambda: nodes.state.count() == 0, message="client records stayed")
    assert nodes.state.room_members("/", "lobby") == []
    assert "io-node" in nodes.output(io) and "Traceback" not in nodes.output(io)
    for client in clients:
        client.close()


# ---- Redis restarts ------------------------------------------------------------------------

@pytest.mark.slow
def test_a_redis_restart_in_the_middle_of_a_chat_loses_no_event_and_no_command(
        durable_redis, nodes_factory):
    nodes = nodes_factory(durable_redis.url, **FAST)
    ios = [nodes.io_node(), nodes.io_node()]
    apps = [nodes.app_node("chat"), nodes.app_node("chat")]
    nodes.wait_registered(*ios, *apps)
    clients = _lobby(nodes, ios[0], 2) + _lobby(nodes, ios[1], 2)
    per_client = 150
    ids = {f"{k}-{n}" for k in range(len(clients)) for n in range(per_client)}
    acks = gevent.queue.Queue()
    sent = []

    def chat(k):
        for n in range(per_client):
            clients[k].sio.emit("say", {"id": f"{k}-{n}", "room": "lobby"},
                                callback=acks.put)
            sent.append(1)
            gevent.sleep(0.03)

    talkers = [gevent.spawn(chat, k) for k in range(len(clients))]
    wait_until(lambda: len(sent) >= 100, timeout=20, message="the chat stalled")
    down = time.monotonic()
    durable_redis.stop()          # SIGTERM: redis-server writes its last data and exits
    # Redis stays away while the clients say 400 messages: a few seconds, longer than the
    # node_ttl, so every node's heartbeat has lapsed when it comes back
    wait_until(lambda: len(sent) >= 500, timeout=30,
               message="the clients stopped talking while Redis was down")
    durable_redis.start()         # same port, same data
    restart_took = time.monotonic() - down
    gevent.joinall(talkers, timeout=60, raise_error=True)

    def heard(client):
        return {args[0]["id"] for args in client.received("said")}

    wait_until(lambda: all(heard(c) == ids for c in clients), timeout=60, interval=0.1,
               message="a client missed messages said in the room")
    recovered = time.monotonic() - down
    assert nodes.redis.smembers(nodes.key("said")) == ids          # every event handled
    answered = set()
    while len(answered) < len(ids):
        answered.add(acks.get(timeout=30))
    assert answered == ids                                          # every ack came back
    received = sum(len(c.received("said")) for c in clients)
    print(f"\nredis-server down {restart_took:.1f}s during a chat of {len(ids)} "
          f"messages x {len(clients)} clients: all events handled, all {len(ids) * len(clients)}"
          f" broadcasts and {len(ids)} acks delivered ({received - len(ids) * len(clients)} "
          f"duplicates), {recovered:.1f}s after it went down")
    assert all(proc.poll() is None for proc in ios + apps)
    for proc in ios + apps:
        log = nodes.output(proc)
        # said once per outage, not once per message
        assert 1 <= log.count("lost Redis") <= 2 and 1 <= log.count("Redis is back") <= 2, log
        assert "taken for dead" not in log
    for client in clients:
        client.close()


@pytest.mark.slow
def test_a_redis_that_stops_answering_is_noticed_and_nothing_is_lost(durable_redis,
                                                                     nodes_factory):
    # SIGSTOP leaves every TCP connection open with no one answering: a half-open Redis.
    # A 2 s socket timeout (10 s by default) keeps the test short.
    nodes = nodes_factory(durable_redis.url, SIOCLUSTER_REDIS_OPTIONS=json.dumps(
        {"socket_timeout": 2, "health_check_interval": 1}), **FAST)
    io, app = nodes.io_node(), nodes.app_node("chat")
    nodes.wait_registered(io, app)
    clients = _lobby(nodes, io, 2)
    per_client = 200
    ids = {f"{k}-{n}" for k in range(len(clients)) for n in range(per_client)}
    sent = []

    def chat(k):
        for n in range(per_client):
            clients[k].sio.emit("say", {"id": f"{k}-{n}", "room": "lobby"})
            sent.append(1)
            gevent.sleep(0.03)

    talkers = [gevent.spawn(chat, k) for k in range(len(clients))]
    wait_until(lambda: len(sent) >= 50, timeout=20, message="the chat stalled")
    frozen = time.monotonic()
    os.kill(durable_redis.proc.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: len(sent) >= 300, timeout=30,
                   message="the clients stopped talking while Redis was frozen")
    finally:
        os.kill(durable_redis.proc.pid, signal.SIGCONT)
    frozen_for = time.monotonic() - frozen
    gevent.joinall(talkers, timeout=60, raise_error=True)
    wait_until(lambda: all({a[0]["id"] for a in c.received("said")} == ids for c in clients),
               timeout=60, interval=0.1, message="a client missed messages said in the room")
    assert nodes.redis.smembers(nodes.key("said")) == ids
    duplicates = sum(len(c.received("said")) for c in clients) - len(ids) * len(clients)
    print(f"\nredis-server frozen (SIGSTOP) {frozen_for:.1f}s in a chat of {len(ids)} messages: "
          f"noticed by socket timeouts, nothing lost, {duplicates} duplicate broadcasts")
    for proc in (io, app):
        log = nodes.output(proc)
        assert "lost Redis (TimeoutError" in log or "lost Redis (ConnectionError" in log, log
        assert log.count("lost Redis") <= 2 and "taken for dead" not in log, log
    for client in clients:
        client.close()
