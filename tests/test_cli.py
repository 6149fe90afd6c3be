"""`siocluster`, the operators' command, against a real Redis and real nodes: `status`
(in-process and as a real subprocess), `dead list/show/requeue/purge`, and its errors."""

import io
import json
import os
import subprocess
import sys

import pytest

from siocluster import App
from siocluster.cli import PERSISTENCE_OFF, main
from siocluster.envelope import Envelope
from siocluster.inbox import Inbox
from siocluster.state import Keys
from tests.conftest import ROOT
from tests.helpers import free_port, inbox_messages, wait_until

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


def dead_letter(redis_client, config, raw, **record):
    """A dead-letter record as an app-node writes one (through the inbox's own script)."""
    inbox = Inbox(redis_client, Keys(config.prefix), config)
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
