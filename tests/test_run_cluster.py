"""`make run-cluster`'s runner (`python -m siocluster.cluster`), started and stopped for real."""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys

import gevent
import pytest
import requests
import socketio

from siocluster.state import ClusterState, Keys
from tests.helpers import EventClient, free_port, free_port_run, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Runner:
    """The cluster runner as a subprocess, its output kept line by line."""

    def __init__(self, *args):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIOCLUSTER_")}
        env["PYTHONPATH"] = ROOT
        if "--app-port" not in args:
            # the app-nodes' metrics ports: free ones, not the default 8091 and up
            args = (*args, "--app-port", str(free_port_run(4)))
        self.proc = subprocess.Popen([sys.executable, "-m", "siocluster.cluster", *args],
                                     cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []
        self.reader = gevent.spawn(self._read)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self):
        return "\n".join(self.lines)

    def wait_for(self, pattern, timeout=30):
        """The first match of ``pattern`` in the output, once it is there."""
        def found():
            match = re.search(pattern, self.output, re.M)
            assert match or self.proc.poll() is None, \
                f"the runner exited ({self.proc.returncode}) before {pattern!r}:\n{self.output}"
            return match
        return wait_until(found, timeout=timeout, interval=0.05,
                          message=f"no {pattern!r} in the runner's output:\n{self.output}")

    def pids(self):
        """Node name -> pid, from the runner's ``started NAME (pid N)`` lines."""
        return {name: int(pid)
                for name, pid in re.findall(r"^cluster\s+\| started (\S+) \(pid (\d+)\)$",
                                            self.output, re.M)}

    def stop(self, sig=signal.SIGTERM, timeout=40):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the runner did not stop on {sig!r}:\n{self.output}")
        self.reader.join(timeout=5)
        return code


def children_of(pid):
    """The pids of a process's direct children, from /proc."""
    children = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children.update(int(p) for p in f.read().split())
    return children


def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def port_is_free(port):
    """Nothing listens on the port: a server could bind it now (as servers do, with
    SO_REUSEADDR, since closed connections may linger in TIME_WAIT)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(1)
        except OSError:
            return False
    return True


def read_js(text):
    head, sep, assigned = text.partition("window.SIOCLUSTER = ")
    assert sep, text
    return json.loads(assigned.strip().rstrip(";"))


def browser_like(frontend_port):
    """A client sending the Origin of a page the frontend-node served, as a browser does."""
    return EventClient(websocket_extra_options={"origin": f"http://127.0.0.1:{frontend_port}"})


def call(client, event, payload):
    answer = client.call(event, payload, timeout=10)
    assert answer[0]["ok"] is True, answer
    return answer[0]


def test_runner_starts_a_working_cluster_and_leaves_nothing_behind():
    frontend, io_a, io_b, policy = free_port(), free_port(), free_port(), free_port()
    runner = Runner("--host", "127.0.0.1", "--frontend-port", str(frontend),
                    "--io-ports", f"{io_a} {io_b}", "--app-nodes", "2",
                    "--policy-port", str(policy))
    clients = []
    try:
        runner.wait_for(rf"^cluster\s+\| ready: open http://127\.0\.0\.1:{frontend}/")
        # each io-node and app-node says where its metrics are, and serves them there
        urls = re.findall(r"metrics of (\S+): (http://\S+/metrics)", runner.output)
        assert sorted(name for name, _ in urls) == sorted(
            ["frontend", f"io-{io_a}", f"io-{io_b}", "app-1", "app-2"]), runner.output
        for _, url in urls:
            metrics = requests.get(url, timeout=5)
            assert metrics.status_code == 200 and "siocluster_node_info" in metrics.text
            assert requests.get(url.replace("/metrics", "/readyz"), timeout=5).json()["ready"]
        redis_port = int(runner.wait_for(r"embedded Redis at redis://127\.0\.0\.1:(\d+)/0")
                         .group(1))
        pids = runner.pids()
        assert set(pids) == {"redis", "policy", "frontend", f"io-{io_a}", f"io-{io_b}",
                             "app-1", "app-2"}, runner.output
        assert children_of(runner.proc.pid) == set(pids.values())

        # the frontend lists both io-nodes (the live list: they registered in Redis)
        def listed():
            response = requests.get(f"http://127.0.0.1:{frontend}/config.js", timeout=5)
            assert response.status_code == 200, response.text
            return sorted(s["port"] for s in read_js(response.text)["ioServers"])
        wait_until(lambda: listed() == sorted([io_a, io_b]), timeout=15,
                   message="/config.js did not list both io-nodes")
        page = requests.get(f"http://127.0.0.1:{frontend}/", timeout=5).text
        for part in ('name="name"', 'name="room"', 'name="text"', 'id="messages"',
                     'id="members"', "/config.js", "/socket.io.min.js", "chat.js"):
            assert part in page

        # a chat through both io-nodes, as the page does
        alice, bob = browser_like(frontend), browser_like(frontend)
        clients += [alice, bob]
        for client, port in ((alice, io_a), (bob, io_b)):
            client.sio.connect(f"http://127.0.0.1:{port}", transports=["websocket"],
                               wait_timeout=10)
        call(alice, "join", {"name": "alice", "room": "lobby"})
        assert call(bob, "join", {"name": "bob", "room": "lobby"})["members"] == ["alice", "bob"]
        said = call(alice, "say", {"text": "hello through the runner"})
        assert bob.expect("said", timeout=10)[0][0]["id"] == said["id"]

        # the io-nodes accept the page's origin only
        stranger = EventClient(websocket_extra_options={"origin": "http://evil.example"})
        clients.append(stranger)
        with pytest.raises(socketio.exceptions.ConnectionError):
            stranger.sio.connect(f"http://127.0.0.1:{io_a}", transports=["websocket"],
                                 wait_timeout=5)

        # a node that dies is reported, and the others keep serving
        os.kill(pids[f"io-{io_b}"], signal.SIGKILL)
        runner.wait_for(rf"^cluster\s+\| io-{io_b} \(pid {pids[f'io-{io_b}']}\) was killed "
                        r"by SIGKILL unexpectedly")
        again = call(alice, "say", {"text": "still here"})
        assert alice.expect("said", 2, timeout=10)[1][0]["id"] == again["id"]
    finally:
        for client in clients:
            client.close()
        code = runner.stop(signal.SIGTERM)

    assert code == 0, runner.output
    assert "stopped" in runner.lines[-1], runner.output
    assert "did not stop" not in runner.output, runner.output
    for name, pid in pids.items():
        assert gone(pid), f"{name} (pid {pid}) is still running:\n{runner.output}"
    for port in (frontend, io_a, io_b, policy, redis_port):
        assert port_is_free(port), f"port {port} is still bound:\n{runner.output}"
    redis_dir = re.search(r"\(data in (\S+), removed at stop\)", runner.output).group(1)
    assert not os.path.exists(redis_dir)


def test_ctrl_c_stops_a_cluster_on_a_redis_of_ones_own(config):
    frontend, io_port, policy = free_port(), free_port(), free_port()
    runner = Runner("--frontend-port", str(frontend), "--io-ports", str(io_port),
                    "--app-nodes", "1", "--policy-port", str(policy),
                    "--redis-url", config.redis_url, "--prefix", config.prefix)
    state = ClusterState(config.redis_client(), Keys(config.prefix))
    try:
        runner.wait_for(r"^cluster\s+\| ready: ")
        pids = runner.pids()
        assert set(pids) == {"policy", "frontend", f"io-{io_port}", "app-1"}, runner.output
        assert children_of(runner.proc.pid) == set(pids.values())
        assert f"key prefix {config.prefix!r}" in runner.output
        assert sorted(i["role"] for i in state.nodes().values()) == ["app-node", "io-node"]
    finally:
        code = runner.stop(signal.SIGINT)
    assert code == 0, runner.output
    assert "SIGINT: stopping the cluster" in runner.output
    assert "unexpectedly" not in runner.output, runner.output
    assert [name for name, pid in pids.items() if not gone(pid)] == [], runner.output
    assert all(port_is_free(p) for p in (frontend, io_port, policy)), runner.output
    assert state.nodes(alive=None) == {}      # every node deregistered as it stopped


def test_runner_refuses_a_port_in_use_and_starts_nothing():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        runner = Runner("--frontend-port", str(free_port()), "--io-ports",
                        f"{free_port()} {port}", "--policy-port", str(free_port()))
        code = runner.proc.wait(30)
        runner.reader.join(timeout=5)
    assert code == 1, runner.output
    assert f"cannot start io-{port}: 127.0.0.1:{port} is in use" in runner.output
    assert "IO_PORTS=" in runner.output          # says how to choose another port
    assert runner.pids() == {}


def test_make_run_cluster_passes_its_variables_to_the_runner():
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    result = subprocess.run(
        [make, "-n", "run-cluster", "FRONTEND_PORT=9080", "IO_PORTS=9081 9082 9083",
         "APP_NODES=3", "APP_PORT=9091", "POLICY_PORT=10843", "HOST=0.0.0.0", "REDIS_URL=redis://db:6379/2"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # the recipe is one command over several lines joined by backslashes
    commands = result.stdout.replace("\\\n", " ").splitlines()
    lines = [line for line in commands if "siocluster.cluster" in line]
    assert len(lines) == 1, result.stdout
    args = shlex.split(lines[0])
    args = args[args.index("siocluster.cluster") + 1:]
    assert args == ["--host", "0.0.0.0", "--frontend-port", "9080", "--io-ports",
                    "9081 9082 9083", "--app-nodes", "3", "--app-port", "9091",
                    "--policy-port", "10843",
                    "--redis-url", "redis://db:6379/2"]

    # and the runner takes them: --help parses with the same flags
    from siocluster.cluster import argument_parser

    options = argument_parser().parse_args(args)
    assert (options.io_ports, options.app_nodes, options.redis_url) == (
        [9081, 9082, 9083], 3, "redis://db:6379/2")
