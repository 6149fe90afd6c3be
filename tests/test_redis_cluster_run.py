"""siocluster on a real Redis Cluster, run as its users run it: `make run-cluster
REDIS_URL=redis+cluster://...` (the runner, ``python -m siocluster.cluster``) serving the
example chat, app-nodes and io-nodes as processes (``python -m siocluster.appnode`` /
``siocluster.ionode``) with an app-node SIGKILLed in a burst, the frontend-node's
``/config.js`` from the live io-nodes, and what a bad or unreachable cluster URL says.

The cluster is the session's 3-master `redis_cluster` (tests/conftest.py); each test has a
key prefix of its own. The app the burst runs is `ordered`, below: the app-nodes import it
from this module.
"""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid

import gevent
import pytest
import redis
import requests
from flask import Flask

from siocluster import App, Config, make_frontend_server
from siocluster.embedded import EmbeddedRedisCluster
from siocluster.state import ClusterState
from tests.helpers import free_port, free_port_run, wait_until
from tests.test_faults import FAST, Nodes, connect
from tests.test_run_cluster import ROOT, Runner, browser_like, call, children_of, gone, read_js

pytestmark = pytest.mark.timeout(180)


# ---- the app the burst's app-nodes run ----------------------------------------------------

ordered = App()


@ordered.on("n")
def _n(sid, sender, number):
    # recorded as it is handled (not with the finish): a message handled twice shows twice
    ordered.redis.rpush(ordered.key("got", sender), number)
    ordered.redis.incr(ordered.key("handled"))
    gevent.sleep(0.002)      # a little work: several messages are in flight at any time


# ---- helpers --------------------------------------------------------------------------------

def cluster_config(redis_cluster, prefix=None):
    return Config(redis_url=redis_cluster.url, prefix=prefix or f"run-{uuid.uuid4().hex[:8]}")


class ClusterNodes(Nodes):
    """tests/test_faults.py's node subprocesses, on a Redis Cluster: the test's client is a
    cluster client, the keys the cluster's (tagged, in shards)."""

    def __init__(self, redis_url, log_dir, **settings):   # not Nodes': it takes one Redis
        self.prefix = f"fault-{uuid.uuid4().hex[:8]}"
        self.env = dict(os.environ, PYTHONPATH=ROOT, SIOCLUSTER_REDIS_URL=redis_url,
                        SIOCLUSTER_PREFIX=self.prefix, SIOCLUSTER_RATE_LIMIT="0",
                        SIOCLUSTER_POP_TIMEOUT="0.2", **settings)
        config = Config(redis_url=redis_url, prefix=self.prefix)
        self.redis = config.redis_client()
        self.keys = config.keys()
        self.state = ClusterState(self.redis, self.keys)
        self.log_dir = log_dir
        self.procs = []

    def app_node(self, app, **settings):
        return self._start("app-node", ["siocluster.appnode", app], **settings)

    def held(self, node_id):
        """Clients app-node ``node_id``'s processing lists hold, in every shard."""
        return sum(self.redis.llen(shard.processing(node_id)) for shard in self.keys.shards)


@pytest.fixture
def cluster_nodes(redis_cluster, tmp_path):
    nodes = ClusterNodes(redis_cluster.url, str(tmp_path), **FAST)
    yield nodes
    nodes.close()


def replays(got):
    """How often a client's record goes back to a message already handled; fails unless it
    is every message once, in order, but for runs handled again (after a SIGKILL): each
    next number is the one after, or one already handled, from which the run goes on."""
    back = 0
    for before, after in zip(got, got[1:]):
        assert after == before + 1 or after <= before, f"{before} then {after} in {got}"
        back += after <= before
    return back


def run(args, env=None, timeout=60):
    """A siocluster entry point run to its end: (exit code, output, seconds)."""
    env = dict(env or os.environ)
    env["PYTHONPATH"] = ROOT
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=timeout)
    return result.returncode, result.stdout + result.stderr, time.monotonic() - started


# ---- make run-cluster REDIS_URL=redis+cluster://... -------------------------------------

def test_make_run_cluster_passes_a_cluster_url_to_the_runner():
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    url = "redis+cluster://10.0.0.1:7000,10.0.0.2:7001,10.0.0.3"
    result = subprocess.run([make, "-n", "run-cluster", f"REDIS_URL={url}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    commands = result.stdout.replace("\\\n", " ").splitlines()
    line = next(line for line in commands if "siocluster.cluster" in line)
    args = shlex.split(line)
    assert args[args.index("--redis-url") + 1] == url


def test_the_runner_serves_the_example_chat_on_a_redis_cluster(redis_cluster):
    frontend, io_a, io_b, policy = free_port(), free_port(), free_port(), free_port()
    config = cluster_config(redis_cluster)
    runner = Runner("--host", "127.0.0.1", "--frontend-port", str(frontend),
                    "--io-ports", f"{io_a} {io_b}", "--app-nodes", "2",
                    "--policy-port", str(policy), "--redis-url", redis_cluster.url,
                    "--prefix", config.prefix)
    redis = config.redis_client()
    state = ClusterState(redis, config.keys())
    clients = []
    try:
        runner.wait_for(rf"^cluster\s+\| ready: open http://127\.0\.0\.1:{frontend}/", 60)
        # the runner names the cluster it checked, and starts no Redis of its own
        assert (f"using Redis Cluster at {redis_cluster.url} (3 masters), key prefix "
                f"{config.prefix!r}") in runner.output
        assert "embedded Redis" not in runner.output and "still waiting" not in runner.output
        pids = runner.pids()
        assert set(pids) == {"policy", "frontend", f"io-{io_a}", f"io-{io_b}", "app-1",
                             "app-2"}, runner.output
        assert children_of(runner.proc.pid) == set(pids.values())
        # every node registered where the cluster's registry is (its keys' hash tag)
        assert sorted(i["role"] for i in state.nodes().values()) == [
            "app-node", "app-node", "io-node", "io-node"]
        for name, port in (("frontend", frontend), (f"io-{io_a}", io_a), (f"io-{io_b}", io_b)):
            ready = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
            assert ready.status_code == 200, (name, ready.text)

        # the frontend-node's /config.js: the live io-nodes, found on the cluster
        def listed():
            response = requests.get(f"http://127.0.0.1:{frontend}/config.js", timeout=5)
            assert response.status_code == 200, response.text
            return sorted(s["port"] for s in read_js(response.text)["ioServers"])
        wait_until(lambda: listed() == sorted([io_a, io_b]), timeout=15,
                   message="/config.js did not list both io-nodes")

        # the chat's protocol, members of one room on different io-nodes
        alice, bob, carol = (browser_like(frontend) for _ in range(3))
        clients += [alice, bob, carol]
        for client, port in ((alice, io_a), (bob, io_b), (carol, io_a)):
            client.sio.connect(f"http://127.0.0.1:{port}", transports=["websocket"],
                               wait_timeout=10)
        assert call(alice, "join", {"name": "alice", "room": "lobby"}) == {
            "ok": True, "room": "lobby", "members": ["alice"], "history": []}
        assert call(bob, "join", {"name": "bob", "room": "lobby"})["members"] == ["alice", "bob"]
        assert alice.expect("presence", 2, timeout=10)[1] == [
            {"room": "lobby", "members": ["alice", "bob"], "joined": "bob"}]

        hello = call(alice, "say", {"text": "hello from io-a"})
        said = bob.expect("said", timeout=10)[0][0]
        assert (said["id"], said["name"], said["text"], said["room"]) == (
            hello["id"], "alice", "hello from io-a", "lobby")
        back = call(bob, "say", {"text": "hi from io-b"})
        assert [m[0]["id"] for m in alice.expect("said", 2, timeout=10)] == [
            hello["id"], back["id"]]

        # a later member gets the history, oldest first, and everyone its presence
        joined = call(carol, "join", {"name": "carol", "room": "lobby"})
        assert joined["members"] == ["alice", "bob", "carol"]
        assert [(m["name"], m["text"]) for m in joined["history"]] == [
            ("alice", "hello from io-a"), ("bob", "hi from io-b")]
        expected = {"room": "lobby", "members": ["alice", "bob", "carol"], "joined": "carol"}
        assert bob.expect("presence", 2, timeout=10)[1] == [expected]
        assert alice.expect("presence", 3, timeout=10)[2] == [expected]

        # leaving, and a disconnect, tell the room
        assert call(bob, "leave", {}) == {"ok": True}
        left = {"room": "lobby", "members": ["alice", "carol"], "left": "bob"}
        assert alice.expect("presence", 4, timeout=10)[3] == [left]
        assert carol.expect("presence", 2, timeout=10)[1] == [left]
        carol.close()
        assert alice.expect("presence", 5, timeout=10)[4] == [
            {"room": "lobby", "members": ["alice"], "left": "carol"}]
        # the history is on the cluster, under the prefix
        assert redis.llen(f"{config.prefix}:app:history:lobby") == 2
    finally:
        for client in clients:
            client.close()
        code = runner.stop(signal.SIGTERM)

    assert code == 0, runner.output
    assert "stopped" in runner.lines[-1], runner.output
    assert "unexpectedly" not in runner.output and "did not stop" not in runner.output, \
        runner.output
    assert [name for name, pid in pids.items() if not gone(pid)] == [], runner.output
    assert state.nodes(alive=None) == {}       # every node deregistered as it stopped
    redis.close()


# ---- an app-node SIGKILLed in a burst -----------------------------------------------------

def test_sigkill_of_an_app_node_in_a_burst_loses_nothing_on_a_redis_cluster(cluster_nodes):
    nodes = cluster_nodes
    app = "tests.test_redis_cluster_run:ordered"
    io_a, io_b = nodes.io_node(), nodes.io_node()
    victim, survivor = nodes.app_node(app), nodes.app_node(app)
    nodes.wait_registered(io_a, io_b, victim, survivor)
    victim_id = nodes.node_id(victim)
    senders, per_sender = 6, 500
    total = senders * per_sender
    clients = [connect(io_a if k % 2 else io_b) for k in range(senders)]

    def send(k):
        for n in range(per_sender):
            clients[k].sio.emit("n", (f"c{k}", n))
            if n % 25 == 0:
                gevent.sleep(0)

    started = time.monotonic()
    sending = [gevent.spawn(send, k) for k in range(senders)]
    handled = nodes.key("handled")

    def count():
        return int(nodes.redis.get(handled) or 0)

    wait_until(lambda: count() >= total // 4 and nodes.held(victim_id) > 0, timeout=60,
               interval=0.005, message="the burst did not get going on the victim")
    victim.kill()
    victim.wait()
    killed_at, in_flight = count(), nodes.held(victim_id)
    gevent.joinall(sending, timeout=60, raise_error=True)

    def got(k):
        return [int(n) for n in nodes.redis.lrange(nodes.key("got", f"c{k}"), 0, -1)]

    def everything_handled():
        return all(len(set(got(k))) == per_sender for k in range(senders))
    wait_until(everything_handled, timeout=90, interval=0.2,
               message=f"not every message was handled ({count()} handlings of {total})")
    elapsed = time.monotonic() - started
    again = 0
    for k in range(senders):
        record = got(k)
        assert list(dict.fromkeys(record)) == list(range(per_sender)), f"c{k}: {record}"
        again += replays(record)
    wait_until(lambda: victim_id not in nodes.state.nodes(alive=None), timeout=20,
               message="the dead app-node was not cleaned up")
    assert in_flight > 0, "the victim held no client when killed: nothing was tested"
    assert nodes.held(victim_id) == 0
    assert sum(nodes.redis.llen(shard.dead) for shard in nodes.keys.shards) == 0
    assert survivor.poll() is None and nodes.stop(survivor) == 0, nodes.output(survivor)
    print(f"\n{total} messages from {senders} clients on a 3-master Redis Cluster, app-node "
          f"SIGKILLed after {killed_at} holding {in_flight} client(s): all handled in "
          f"{elapsed:.1f}s, in order per client, {count() - total} handled twice "
          f"({again} replayed run(s))")
    for client in clients:
        client.close()


# ---- the frontend-node ----------------------------------------------------------------------

def test_config_js_lists_the_live_io_nodes_of_a_redis_cluster(cluster_nodes, redis_cluster):
    nodes = cluster_nodes
    config = Config(redis_url=redis_cluster.url, prefix=nodes.prefix)
    app = Flask(__name__)
    app.testing = True
    client = make_frontend_server(app, config).test_client()

    def listed():
        response = client.get("/config.js")
        assert response.status_code == 200, response.get_data(as_text=True)
        return sorted(s["port"] for s in read_js(response.get_data(as_text=True))["ioServers"])

    assert listed() == []
    a = nodes.io_node(SIOCLUSTER_PUBLIC_HOST="io-a.example.com")
    b = nodes.io_node(SIOCLUSTER_PUBLIC_HOST="io-b.example.com")
    nodes.wait_registered(a, b)
    assert listed() == sorted([a.port, b.port])
    body = client.get("/config.json").get_json()["ioServers"]
    assert sorted(s["url"] for s in body) == sorted(
        [f"http://io-a.example.com:{a.port}", f"http://io-b.example.com:{b.port}"])
    assert client.get("/readyz").status_code == 200

    # a stopped io-node leaves the list at once; a killed one when its heartbeat expires
    assert nodes.stop(a) == 0, nodes.output(a)
    assert listed() == [b.port]
    b.kill()
    b.wait()
    wait_until(lambda: listed() == [], timeout=float(FAST["SIOCLUSTER_NODE_TTL"]) + 5,
               interval=0.1, message="a dead io-node stayed listed")


# ---- a bad or unreachable cluster URL -----------------------------------------------------

ENTRY_POINTS = {
    "app-node": lambda url: (["siocluster.appnode", "example_chat.app:app"],
                             {"SIOCLUSTER_REDIS_URL": url}),
    "io-node": lambda url: (["siocluster.ionode", "--port", str(free_port())],
                            {"SIOCLUSTER_REDIS_URL": url}),
    "runner": lambda url: (["siocluster.cluster", "--redis-url", url, "--frontend-port",
                            str(free_port()), "--io-ports", str(free_port()), "--app-port",
                            str(free_port_run(2)), "--policy-port", str(free_port())], {}),
}


def refused(entry, url, *expected, within=15.0):
    """Run ``entry`` on ``url``: it must exit non-zero within ``within`` seconds, with no
    traceback, naming REDIS_URL and saying ``expected``; returns its output."""
    args, env = ENTRY_POINTS[entry](url)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SIOCLUSTER_")}
    code, output, seconds = run(args, dict(environ, **env), timeout=within + 30)
    assert code != 0, f"{entry} on {url} exited 0:\n{output}"
    assert seconds < within, f"{entry} on {url} took {seconds:.1f}s:\n{output}"
    assert "Traceback" not in output, f"{entry} on {url}:\n{output}"
    assert "REDIS_URL" in output, f"{entry} on {url}:\n{output}"
    for part in expected:
        assert part in output, f"{entry} on {url}: no {part!r} in\n{output}"
    if entry == "runner":
        assert "started " not in output, output       # no node was started
    return output


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_a_bad_or_unreachable_cluster_url_is_refused_clearly(entry, redis_cluster, redis_server):
    nowhere = free_port()
    refused(entry, f"redis+cluster://127.0.0.1:{nowhere}",
            f"cannot reach a Redis Cluster through 127.0.0.1:{nowhere}", "Connection refused")
    refused(entry, "redis+cluster://:6379", "names no cluster host")
    refused(entry, "redis+cluster://h:1/3", "Redis Cluster has database 0 only")
    # a Redis without cluster mode named as a cluster, and a cluster's node as one Redis
    refused(entry, f"redis+cluster://127.0.0.1:{redis_server.port}",
            "is not a Redis Cluster node", "redis://host:port/db")
    for node in redis_cluster.seeds:    # whichever master the node's first keys are on
        refused(entry, f"redis://127.0.0.1:{node}/0", "is a node of a Redis Cluster",
                "redis+cluster://")


def test_a_cluster_that_serves_not_every_slot_is_refused_clearly():
    cluster = EmbeddedRedisCluster(masters=3, replicas=0, node_timeout_ms=1000).start()
    try:
        dead = cluster.seeds[-1]
        cluster.kill(dead)

        def failed():
            for port in cluster.seeds[:-1]:
                with redis.Redis(port=port, decode_responses=True) as client:
                    if "cluster_state:fail" not in client.execute_command("CLUSTER", "INFO"):
                        return False
            return True
        wait_until(failed, timeout=30, interval=0.1, message="the cluster did not fail")
        for entry in sorted(ENTRY_POINTS):
            # the slots of the master that is gone, or a key there, whichever comes first
            output = refused(entry, cluster.url, "Redis Cluster at", "redis-cli --cluster check")
            assert ("does not serve every slot" in output
                    or f"cannot be reached (Error 111 connecting to 127.0.0.1:{dead}" in output), \
                output
    finally:
        cluster.stop()
