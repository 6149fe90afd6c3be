"""The nodes as their users run them: `python -m ...` and gunicorn, in subprocesses."""

import json
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.helpers import EventClient, free_port, wait_until


class Process:
    def __init__(self, args, env):
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)

    def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            raise AssertionError(f"{self.proc.args} did not stop on {sig!r}:\n{out}")
        return self.proc.returncode, out


def gunicorn_io_node(port, env, *options):
    """An io-node under gunicorn's gevent-websocket worker, as the README runs it."""
    return Process([sys.executable, "-m", "gunicorn", "-k",
                    "geventwebsocket.gunicorn.workers.GeventWebSocketWorker", "-w", "1",
                    *options, "-b", f"127.0.0.1:{port}", "siocluster.wsgi:application"],
                   dict(env, SIOCLUSTER_HTTP_PORT=str(port)))


def _live(config, role):
    from siocluster.state import ClusterState

    return ClusterState(config.redis_client(), config.keys()).nodes(role=role)


@pytest.fixture(params=["one-redis", "redis-cluster"])
def anywhere(request, config, node_env):
    """The test's cluster config and node environment, on one Redis and on a Redis Cluster
    (``redis+cluster://``)."""
    if request.param == "one-redis":
        return config, node_env
    url = request.getfixturevalue("redis_cluster").url
    return config.replace(redis_url=url), dict(node_env, SIOCLUSTER_REDIS_URL=url)


def _echo_through(port, transport="websocket"):
    client = EventClient()
    client.sio.connect(f"http://127.0.0.1:{port}", transports=[transport], wait_timeout=10)
    try:
        return client.call("echo", "via " + transport, timeout=10)
    finally:
        client.close()


def test_python_m_ionode_and_appnode(anywhere):
    config, node_env = anywhere
    port = free_port()
    io = Process([sys.executable, "-m", "siocluster.ionode", "--port", str(port)], node_env)
    app = Process([sys.executable, "-m", "siocluster.appnode", "tests.apps:echo",
                   "--workers", "2"], node_env)
    try:
        wait_until(lambda: _live(config, "io-node") and _live(config, "app-node"), timeout=20,
                   message="nodes did not register")
        answer = _echo_through(port)
        assert answer[0]["echo"] == "via websocket"
        assert answer[0]["pid"] == app.proc.pid
        # what the app-node made while starting is out of the collector's reach (the app,
        # siocluster, gevent, redis-py: tens of thousands of objects)
        assert answer[0]["frozen"] > 10_000
    finally:
        io_code, io_out = io.stop()
        app_code, app_out = app.stop()
    assert io_code == 0, io_out
    assert app_code == 0, app_out
    assert _live(config, None) == {}      # both deregistered on SIGTERM


def test_log_format_json_gives_one_event_a_line_with_node_kind_and_client(config, node_env):
    port = free_port()
    io = Process([sys.executable, "-m", "siocluster.ionode", "--port", str(port),
                  "--log-format", "json", "--log-level", "debug"], node_env)
    app = Process([sys.executable, "-m", "siocluster.appnode", "tests.apps:echo",
                   "--workers", "2"], dict(node_env, SIOCLUSTER_LOG_FORMAT="json",
                                           SIOCLUSTER_LOG_LEVEL="warning"))
    try:
        wait_until(lambda: _live(config, "io-node") and _live(config, "app-node"), timeout=20,
                   message="nodes did not register")
        client = EventClient()
        client.sio.connect(f"http://127.0.0.1:{port}", transports=["websocket"],
                           wait_timeout=10)
        sid = client.sid
        client.sio.emit("no-client", "reserved")        # refused, and logged with its sid
        client.expect("error")
        client.close()
    finally:
        _, io_out = io.stop()
        _, app_out = app.stop()
    io_lines = [json.loads(line) for line in io_out.splitlines() if line.strip()]
    node_id = next(iter({line["node"] for line in io_lines}))
    assert {line["kind"] for line in io_lines} == {"io-node"} and node_id.startswith("io-node")
    assert "DEBUG" in {line["level"] for line in io_lines}
    frozen = [line["msg"] for line in io_lines if "startup objects frozen" in line["msg"]]
    assert len(frozen) == 1 and int(frozen[0].split(": ")[1].split()[0]) > 10_000, frozen
    refusal = [line for line in io_lines if line.get("sid") == sid]
    assert refusal and refusal[0]["level"] == "WARNING" and refusal[0]["event"] == "no-client"
    app_lines = [json.loads(line) for line in app_out.splitlines() if line.strip()]
    assert {line["level"] for line in app_lines} <= {"WARNING", "ERROR", "CRITICAL"}
    assert all(line["kind"] == "app-node" for line in app_lines)


def test_a_bad_log_setting_is_refused_with_its_name(node_env):
    proc = subprocess.run([sys.executable, "-m", "siocluster.appnode", "tests.apps:echo",
                           "--log-format", "xml"], cwd=ROOT, env=node_env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode != 0 and "LOG_FORMAT" in proc.stderr


def test_gunicorn_runs_an_io_node(anywhere):
    config, node_env = anywhere
    pytest.importorskip("gunicorn")
    port = free_port()
    gunicorn = gunicorn_io_node(port, dict(node_env, SIOCLUSTER_LOG_LEVEL="debug"))
    app = Process([sys.executable, "-m", "siocluster.appnode", "tests.apps:echo"], node_env)
    try:
        wait_until(lambda: _live(config, "app-node"), timeout=20, message="no app-node")
        wait_until(lambda: gunicorn.proc.poll() is not None or _port_open(port), timeout=20,
                   message="gunicorn did not listen")
        assert gunicorn.proc.poll() is None, gunicorn.stop()[1]
        assert _echo_through(port, "websocket")[0]["echo"] == "via websocket"
        assert _echo_through(port, "polling")[0]["echo"] == "via polling"
        assert [n["port"] for n in _live(config, "io-node").values()] == [port]
    finally:
        gunicorn_code, gunicorn_out = gunicorn.stop()
        app.stop()
    assert gunicorn_code == 0, gunicorn_out
    assert "startup objects frozen" in gunicorn_out, gunicorn_out


def test_a_sigterm_while_a_node_finishes_starting_stops_it_gracefully():
    """What `run_until_signalled` does before it waits (freezing the startup objects) runs
    with SIGTERM already caught: the signal is kept for the wait, not the process killed."""
    code = ("from gevent import monkey; monkey.patch_all()\n"
            "import logging, os, signal\n"
            "from siocluster.node import Node\n"
            "class Starting:\n"
            "    role, id, logger = 'node', 'n1', logging.getLogger()\n"
            "    def freeze_startup_objects(self):\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "    def stop(self):\n"
            "        print('stopping gracefully')\n"
            "Node.run_until_signalled(Starting())\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert (proc.returncode, proc.stdout) == (0, "stopping gracefully\n"), proc.stderr


@pytest.mark.parametrize("module,args,doing", [
    ("appnode", ["tests.apps:echo", "--workers", "2"], "draining"),
    ("ionode", ["--port", "0"], "stopping"),
])
def test_a_sigterm_right_after_a_node_registers_stops_it_gracefully(config, node_env, module,
                                                                     args, doing):
    """The entry points catch SIGTERM before the node registers in Redis: a signal between
    its registration and the wait stops it gracefully and deregisters it, where the default
    action would kill it registered (left for the reaper to find)."""
    code = ("from gevent import monkey; monkey.patch_all()\n"
            "import os, signal\n"
            f"from siocluster import {module} as entry\n"
            "cls = entry.AppNode if hasattr(entry, 'AppNode') else entry.IoNode\n"
            "start = cls.start\n"
            "def start_then_signal(self):\n"
            "    start(self)\n"
            "    print('registered', self.id in self.state.nodes(role=self.role), flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return self\n"
            "cls.start = start_then_signal\n"
            f"entry.main({args!r})\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=node_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "registered True\n", proc.stdout + proc.stderr
    assert f" {doing}" in proc.stderr, proc.stderr
    assert _live(config, None) == {}      # deregistered


def test_entry_point_says_what_to_do_without_redis(node_env):
    env = dict(node_env, SIOCLUSTER_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    proc = subprocess.run([sys.executable, "-m", "siocluster.appnode", "tests.apps:echo"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "cannot reach Redis" in proc.stderr and "REDIS_URL" in proc.stderr


def test_unknown_app_is_reported(node_env):
    proc = subprocess.run([sys.executable, "-m", "siocluster.appnode", "tests.apps:nothing"],
                          cwd=ROOT, env=node_env, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "is not a siocluster.App" in proc.stderr


def _port_open(port):
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
