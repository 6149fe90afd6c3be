"""`siocluster`, the operators' command, against a real Redis and real nodes: `status`
(in-process and as a real subprocess), `dead list/show/requeue/purge`, and its errors."""

import io
import json
import os
import subprocess
import sys

import pytest

from siocluster import App, Config
from siocluster.cli import PERSISTENCE_OFF, main
from siocluster.envelope import Envelope
from siocluster.inbox import Inbox
from siocluster.state import Keys
from tests.conftest import ROOT, Cluster
from tests.helpers import enqueue, free_port, hold, inbox_messages, wait_until

# an app whose "flaky" handler raises while FLAKY["fail"] is above 0, then succeeds
FLAKY = {"fail": 0, "handled": []}
app = App()


@app.on("join")
def _join(sid, room):
    app.enter_room(sid, room)
    return True


@app.on("flaky")
def _flaky(sid, data):
    if FLAKY["fail"] > 0:
        FLAKY["fail"] -= 1
        raise RuntimeError("not yet")
    FLAKY["handled"].append(data)
    return {"ok": True, "data": data}


@pytest.fixture(autouse=True)
def no_siocluster_env(monkeypatch):
    """The command reads SIOCLUSTER_* variables: none from the shell running the tests."""
    for name in list(os.environ):
        if name.startswith("SIOCLUSTER_"):
            monkeypatch.delenv(name)


@pytest.fixture
def cli(config, capsys):
    """Run `siocluster ...` in this process on the test's cluster: (exit code, out, err)."""
    def run(*args):
        code = main(["--redis-url", config.redis_url, "--prefix", config.prefix, *args])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def dead_letter(redis_client, config, raw, sid=None, **record):
    """A dead-letter record as an app-node writes one (through the inbox's own script), in
    the list of client ``sid``'s shard (the first shard's without one)."""
    keys = config.keys()
    shard = keys.shard(sid) if sid else keys.shards[0]
    inbox = Inbox(redis_client, shard, config, share=len(keys.shards))
    pipe = redis_client.pipeline(transaction=False)
    inbox.dead_letter(pipe, {"error": "RuntimeError: boom", "raw": raw, "app_node": "app-x",
                             **record})
    pipe.execute()


def event(sid, n, attempt=5):
    return Envelope("event", "/", sid, "io-x", event="say", args=[n], attempt=attempt).encode()


def test_status_json_names_every_node_with_its_kind_and_counts_clients_and_rooms(
        cluster, cli):
    io1, io2 = cluster.io_node(), cluster.io_node()
    app_node = cluster.app_node(app)
    client = cluster.client(io1)
    assert client.call("join", "lobby") == [True]

    def status():
        code, out, _ = cli("status", "--json")
        assert code == 0
        found = json.loads(out)
        io_clients = sum(n.get("clients") or 0 for n in found["nodes"])
        return found if io_clients == 1 and found["clients"] == 1 else None

    found = wait_until(status, timeout=5, message="the io-node's heartbeat did not show its client")
    nodes = {n["id"]: n for n in found["nodes"]}
    assert {i: n["kind"] for i, n in nodes.items()} == {
        io1.id: "io-node", io2.id: "io-node", app_node.id: "app-node"}
    assert all(n["alive"] for n in nodes.values())
    assert nodes[io1.id]["clients"] == 1 and nodes[io2.id]["clients"] == 0
    assert nodes[io1.id]["address"]["port"] == io1.address[1]
    assert nodes[io1.id]["address"]["tls"] is False
    assert nodes[app_node.id]["processing"] == 0 and found["inbox"]["processing"] == {
        app_node.id: 0}
    assert set(found["streams"]["nodes"]) == {io1.id, io2.id}
    assert found["rooms"] == {"count": 1, "complete": True}
    assert found["parked"] == 0 and found["dead_letters"] == 0
    # the test Redis runs with appendonly no and save ""
    assert found["redis"]["persistence"] == {"checked": True, "appendonly": "no", "save": ""}
    assert PERSISTENCE_OFF in found["warnings"]

    code, out, _ = cli("status")
    assert code == 0
    assert f"io-node   {io1.id}" in out and f"app-node  {app_node.id}" in out
    assert "clients          1 (0 of them parked" in out and "rooms            1" in out
    assert "! " + PERSISTENCE_OFF in out


def test_status_as_a_real_command_reads_its_cluster_from_the_environment(cluster, node_env):
    io_node = cluster.io_node()
    result = subprocess.run([sys.executable, "-m", "siocluster", "status", "--json"],
                            env=node_env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["prefix"] == node_env["SIOCLUSTER_PREFIX"]
    assert [(n["id"], n["kind"], n["alive"]) for n in found["nodes"]] == [
        (io_node.id, "io-node", True)]
    assert PERSISTENCE_OFF in found["warnings"]
    assert any("no app-node is alive" in w for w in found["warnings"])


def test_status_warns_of_dead_nodes_still_registered_and_of_dead_letters(
        config, redis_client, cli):
    keys = Keys(config.prefix)
    redis_client.hset(keys.nodes, "io-node-gone", json.dumps(
        {"id": "io-node-gone", "role": "io-node", "started_at": 1.0, "internal": "10.0.0.9",
         "external": "chat.example.com", "port": 443, "tls": True, "clients": 7}))
    dead_letter(redis_client, config, event("s1", 1))
    code, out, _ = cli("status")
    assert code == 0
    assert "DEAD" in out and "https://chat.example.com:443" in out
    assert "! io-node io-node-gone is dead (its heartbeat lapsed) but still registered" in out
    assert f"! 1 message(s) in the dead-letter list {keys.dead}" in out
    found = json.loads(cli("status", "--json")[1])
    assert found["nodes"][0]["alive"] is False and found["dead_letters"] == 1


def test_status_on_a_redis_that_refuses_config_says_persistence_could_not_be_checked(
        config, redis_client, capsys):
    user = f"cli-{config.prefix}"
    redis_client.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"],
                             commands=["+@all", "-config"])
    try:
        url = config.redis_url.replace("redis://", f"redis://{user}:pw@")
        assert main(["--redis-url", url, "--prefix", config.prefix, "status", "--json"]) == 0
        found = json.loads(capsys.readouterr().out)
        assert found["redis"]["url"] == config.redis_url          # no credentials shown
        assert found["redis"]["persistence"]["checked"] is False
        assert found["warnings"][0].startswith("could not check Redis persistence (CONFIG GET:")
        code = main(["--redis-url", url.replace(":pw@", ":wrong@"), "dead", "list"])
        err = capsys.readouterr().err
        assert code == 1 and "refused the user or password" in err and "wrong" not in err
    finally:
        redis_client.acl_deluser(user)


def test_a_dead_lettered_message_requeued_is_handled_and_its_ack_arrives(
        cluster, config, redis_client, cli):
    keys = Keys(config.prefix)
    FLAKY.update(fail=1, handled=[])
    io_node = cluster.io_node()
    cluster.app_node(app, max_attempts=1)      # the first failure dead-letters it
    client = cluster.client(io_node)
    acks = []
    client.sio.emit("flaky", "hello", callback=lambda *a: acks.append(list(a)))
    wait_until(lambda: redis_client.llen(keys.dead) == 1, message="nothing dead-lettered")
    assert FLAKY["handled"] == [] and acks == []

    code, out, _ = cli("dead", "list")
    assert code == 0
    assert "1 dead letters" in out and "event 'flaky'" in out and client.sid in out
    assert "RuntimeError: not yet" in out
    code, out, _ = cli("dead", "show", "0")
    record = json.loads(out)
    assert code == 0 and record["error"] == "RuntimeError: not yet"
    envelope = json.loads(cli("dead", "show", "0", "--envelope")[1])
    assert (envelope["event"], envelope["args"], envelope["attempt"]) == ("flaky", ["hello"], 1)
    assert json.loads(cli("dead", "show", envelope["id"])[1]) == record    # by message id

    code, out, _ = cli("dead", "requeue", "0")
    assert code == 0 and out.startswith(f"requeued [0] event 'flaky' of {client.sid}")
    wait_until(lambda: FLAKY["handled"] == ["hello"], message="the requeued message was not "
               "handled")
    wait_until(lambda: acks == [[{"ok": True, "data": "hello"}]], message="no ack")
    assert redis_client.llen(keys.dead) == 0
    # the inbox's counters and ready list are as before the message came
    wait_until(lambda: inbox_messages(redis_client, keys) == 0)
    assert redis_client.llen(keys.ready) == 0


def test_requeue_all_keeps_order_and_attempts_and_leaves_what_it_cannot_requeue(
        config, redis_client, cli):
    keys = Keys(config.prefix)
    dead_letter(redis_client, config, event("s1", 1))
    dead_letter(redis_client, config, event("s1", 2))
    dead_letter(redis_client, config.replace(dead_record_size=100), event("s1", "x" * 500))
    dead_letter(redis_client, config, "not json", error="malformed: not JSON")
    code, out, err = cli("dead", "requeue", "0")              # the newest: malformed
    assert code == 1 and "malformed" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli("dead", "requeue", "1")               # cut short
    assert code == 1 and "cut short" in err
    assert redis_client.llen(keys.dead) == 4
    code, out, err = cli("dead", "requeue", "--all")
    assert code == 0 and "2 requeued, 2 left" in out and "cut short" in err
    queue = redis_client.lrange(keys.queue("s1"), 0, -1)
    queued = [Envelope.decode(raw) for raw in reversed(queue)]
    assert [(e.args, e.attempt) for e in queued] == [([1], 5), ([2], 5)]    # oldest first
    assert redis_client.lrange(keys.ready, 0, -1) == ["s1"]
    assert inbox_messages(redis_client, keys) == 2
    assert redis_client.llen(keys.dead) == 2
    code, out, _ = cli("dead", "list", "--limit", "1")
    assert code == 0 and "(cut)" not in out and "(the newest 1; --limit N for more)" in out
    assert "(cut)" in cli("dead", "list")[1]


def test_purge_asks_on_a_terminal_refuses_without_one_and_deletes_with_yes(
        config, redis_client, cli, monkeypatch):
    keys = Keys(config.prefix)
    dead_letter(redis_client, config, event("s1", 1))
    dead_letter(redis_client, config, event("s1", 2))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, out, err = cli("dead", "purge")
    assert code == 2 and "run with --yes" in err and redis_client.llen(keys.dead) == 2

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("n\n"))
    code, out, err = cli("dead", "purge")
    assert code == 1 and "[y/N]" in out and "nothing deleted" in err
    assert redis_client.llen(keys.dead) == 2
    monkeypatch.setattr(sys, "stdin", Terminal("y\n"))
    code, out, _ = cli("dead", "purge")
    assert code == 0 and "deleted 2 dead letters" in out and redis_client.llen(keys.dead) == 0
    dead_letter(redis_client, config, event("s1", 3))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, out, _ = cli("dead", "purge", "--yes")
    assert code == 0 and "deleted 1 dead letters" in out and not redis_client.exists(keys.dead)
    assert cli("dead", "purge")[:2] == (0, f"{keys.dead} is empty: nothing to delete\n")


def test_errors_are_one_line_with_their_exit_code(config, cli, capsys, monkeypatch):
    code, _, err = cli("dead", "show", "3")
    assert code == 1 and err == f"siocluster: no dead letter at index 3: {config.prefix}:dead " \
                                "holds 0\n"
    assert cli("dead", "show", "f00")[0] == 1
    for args in (["dead"], ["status", "--bogus"], ["dead", "requeue"], ["nothing"]):
        assert main(args) == 2
    capsys.readouterr()
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    for args in (["status"], ["status", "--json"], ["dead", "list"]):
        code = main(["--redis-url", url, *args])
        out, err = capsys.readouterr()
        assert code == 1 and out == ""
        assert err.startswith("siocluster: cannot reach Redis at redis://127.0.0.1:")
        assert len(err.splitlines()) == 1 and "secret" not in err and "Traceback" not in err
    monkeypatch.setenv("SIOCLUSTER_PREFIX", "two words")
    assert main(["status"]) == 2
    assert "PREFIX" in capsys.readouterr().err


# ---- several shards, and a real Redis Cluster --------------------------------------------------

def run_cli(config, capsys, *args):
    """`siocluster ...` on the cluster of ``config`` (its URL and prefix; other settings from
    SIOCLUSTER_* variables): (exit code, out, err)."""
    code = main(["--redis-url", config.redis_url, "--prefix", config.prefix, *args])
    out, err = capsys.readouterr()
    return code, out, err


def sid_in(keys, shard, stem="s"):
    """A sid in shard ``shard`` of ``keys``."""
    return next(sid for sid in (f"{stem}{n}" for n in range(1000))
                if keys.shard(sid).index == shard)


def test_status_and_dead_letters_over_three_shards_on_one_redis(
        config, redis_client, capsys, monkeypatch):
    config = config.replace(shards=3)
    keys = config.keys()
    monkeypatch.setenv("SIOCLUSTER_SHARDS", "3")    # no node recorded the layout here
    sids = [sid_in(keys, shard) for shard in range(3)]
    redis_client.hset(keys.nodes, mapping={
        "app-x": json.dumps({"id": "app-x", "role": "app-node", "started_at": 1.0}),
        "io-x": json.dumps({"id": "io-x", "role": "io-node", "started_at": 1.0})})
    for n, sid in enumerate(sids):
        shard = keys.shard(sid)
        redis_client.hset(shard.clients, sid, json.dumps({"sid": sid, "node": "io-x"}))
        redis_client.sadd(shard.room("/", f"room-{n}"), sid)
        assert enqueue(redis_client, shard, Envelope("event", "/", sid, "io-x", event="say",
                                                     args=[n])) == []
    for sid in sids[:2]:         # app-x holds the clients of shards 0 and 1
        assert hold(redis_client, keys.shard(sid), keys.shard(sid).processing("app-x")) == [sid]
    for sid in (sids[2], sids[0], sids[1]):
        dead_letter(redis_client, config, event(sid, sid), sid=sid)
    assert [redis_client.llen(shard.dead) for shard in keys.shards] == [1, 1, 1]

    code, out, _ = run_cli(config, capsys, "status", "--json")
    found = json.loads(out)
    assert code == 0 and found["shards"] == {"count": 3, "masters": None}
    assert (found["clients"], found["dead_letters"], found["rooms"]) == (
        3, 3, {"count": 3, "complete": True})
    assert found["inbox"] == {"messages": 3, "bytes": found["inbox"]["bytes"], "ready": 1,
                              "processing": {"app-x": 2}}
    assert [n["processing"] for n in found["nodes"] if n["id"] == "app-x"] == [2]
    assert f"3 message(s) in the dead-letter list {config.prefix}:{{*}}:dead (3 shards): " \
        "see `siocluster dead list`" in found["warnings"]
    code, out, _ = run_cli(config, capsys, "status")
    assert code == 0 and "\nshards           3\n" in out and "dead letters     3" in out
    assert "clients          3 (0 of them parked" in out and "holding 2 clients" in out

    # dead list: the newest first over every shard, each named SHARD:INDEX
    code, out, _ = run_cli(config, capsys, "dead", "list")
    lines = out.splitlines()
    assert code == 0
    assert lines[0] == f"{config.prefix}:{{*}}:dead (3 shards): 3 dead letters, newest first"
    assert lines[1].split()[0] == "SHARD:INDEX"
    assert [(line.split()[0], line.split()[-3]) for line in lines[2:]] == [
        ("1:0", sids[1]), ("0:0", sids[0]), ("2:0", sids[2])]
    assert "(the newest 2; --limit N for more)" in run_cli(config, capsys, "dead", "list",
                                                           "--limit", "2")[1]
    # show: by SHARD:INDEX or message id; a bare index is ambiguous with several shards
    record = json.loads(run_cli(config, capsys, "dead", "show", "2:0")[1])
    message = json.loads(record["raw"])
    assert message["sid"] == sids[2]
    assert json.loads(run_cli(config, capsys, "dead", "show", message["id"])[1]) == record
    code, _, err = run_cli(config, capsys, "dead", "show", "0")
    assert code == 1 and "name a dead letter SHARD:INDEX" in err
    code, _, err = run_cli(config, capsys, "dead", "show", "3:0")
    assert code == 1 and "no shard 3: the cluster has 3 (0 to 2)" in err
    code, _, err = run_cli(config, capsys, "dead", "show", "1:4")
    assert err == f"siocluster: no dead letter at index 1:4: {keys.shards[1].dead} holds 1\n"

    # requeue: into the queue of the client's shard, the record gone from its shard's list
    code, out, _ = run_cli(config, capsys, "dead", "requeue", "2:0")
    assert code == 0 and out.startswith(f"requeued [2:0] event 'say' of {sids[2]}")
    assert "no longer connected" not in out
    assert redis_client.llen(keys.shards[2].queue(sids[2])) == 2
    assert redis_client.llen(keys.shards[2].dead) == 0
    code, out, _ = run_cli(config, capsys, "dead", "requeue", "--all")
    assert code == 0 and f"2 requeued, 0 left in {config.prefix}:{{*}}:dead (3 shards)" in out
    assert [redis_client.llen(keys.shard(sid).queue(sid)) for sid in sids] == [2, 2, 2]
    assert inbox_messages(redis_client, keys.shards[0]) == 2
    assert redis_client.lrange(keys.shards[2].ready, 0, -1) == [sids[2]]   # 0 and 1: held

    # purge: every shard's list
    dead_letter(redis_client, config, event(sids[0], 9), sid=sids[0])
    dead_letter(redis_client, config, event(sids[2], 9), sid=sids[2])
    code, out, _ = run_cli(config, capsys, "dead", "purge", "--yes")
    assert code == 0 and f"deleted 2 dead letters from {config.prefix}:{{*}}:dead" in out
    assert sum(redis_client.llen(shard.dead) for shard in keys.shards) == 0

    # SHARDS set here, but not as the nodes recorded it
    redis_client.set(keys.layout, "3")
    monkeypatch.setenv("SIOCLUSTER_SHARDS", "2")
    code, _, err = run_cli(config, capsys, "status")
    assert code == 1 and "lay their keys out in 3 shard(s): set SHARDS=3" in err


def cluster_settings(request, config) -> Config:
    """The config of a cluster of 3 shards: on the test Redis (SHARDS=3), or on a real Redis
    Cluster of 3 masters (3 shards by default)."""
    if request.param == "one-redis":
        return config.replace(shards=3)
    redis_cluster = request.getfixturevalue("redis_cluster")
    return Config(redis_url=redis_cluster.url, prefix=config.prefix, pop_timeout=0.2,
                  heartbeat_interval=0.3, node_ttl=1.5, connect_timeout=3.0, call_timeout=3.0,
                  workers=4, rate_limit=0)


@pytest.fixture(params=["one-redis", "redis-cluster"])
def sharded(request, config):
    cluster = Cluster(cluster_settings(request, config))
    yield cluster
    cluster.stop()


@pytest.mark.timeout(120)
def test_status_and_requeue_over_shards_with_live_nodes(sharded, capsys):
    config = sharded.config
    keys, redis = config.keys(), config.redis_client()
    FLAKY.update(fail=10 ** 6, handled=[])
    io_node = sharded.io_node()
    sharded.app_node(app, max_attempts=1)
    clients, by_shard = [], {}
    while len(by_shard) < 2:        # clients until two shards have one
        assert len(clients) < 30
        clients.append(sharded.client(io_node))
        assert clients[-1].call("join", f"room-{len(clients)}") == [True]
        by_shard.setdefault(keys.shard(clients[-1].sid).index, clients[-1])
    acks = {}
    for shard, client in by_shard.items():
        client.sio.emit("flaky", shard, callback=lambda *a, shard=shard: acks.update({shard: a}))
    wait_until(lambda: sum(redis.llen(shard.dead) for shard in keys.shards) == 2,
               message="the failing messages were not dead-lettered")

    def status():   # SHARDS is not set for the command: it reads the nodes' layout
        code, out, _ = run_cli(config, capsys, "status", "--json")
        assert code == 0
        found = json.loads(out)
        io_clients = sum(n.get("clients") or 0 for n in found["nodes"])
        return found if io_clients == len(clients) else None

    found = wait_until(status, message="the io-node's heartbeat did not show its clients")
    assert (found["clients"], found["dead_letters"], found["rooms"]) == (
        len(clients), 2, {"count": len(clients), "complete": True})
    assert found["shards"]["count"] == 3
    code, out, _ = run_cli(config, capsys, "status")
    assert code == 0 and "dead letters     2" in out
    if config.on_redis_cluster:
        masters = found["shards"]["masters"]      # one shard on each of the 3 masters
        assert sorted(masters.values()) == [[0], [1], [2]] and len(set(masters)) == 3
        assert sorted(found["redis"]["persistence"]["masters"]) == sorted(masters)
        assert PERSISTENCE_OFF + " (on every master)" in found["warnings"]
        assert f"shards           3, on 3 masters: {next(iter(masters))} holds 0; " in out
    else:
        assert found["shards"]["masters"] is None and "\nshards           3\n" in out

    code, out, _ = run_cli(config, capsys, "dead", "list")
    assert code == 0 and "2 dead letters" in out
    for shard, client in by_shard.items():
        assert f"  {shard}:0 " in out and client.sid in out
    FLAKY["fail"] = 0
    code, out, _ = run_cli(config, capsys, "dead", "requeue", "--all")
    assert code == 0 and "2 requeued, 0 left" in out
    wait_until(lambda: sorted(FLAKY["handled"]) == sorted(by_shard),
               message="the requeued messages were not handled")
    wait_until(lambda: acks == {shard: ({"ok": True, "data": shard},) for shard in by_shard},
               message="no acks")
    assert sum(redis.llen(shard.dead) for shard in keys.shards) == 0
    wait_until(lambda: sum(inbox_messages(redis, shard) for shard in keys.shards) == 0)
    redis.close()
