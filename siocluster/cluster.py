"""Run a whole cluster on one machine, each node a process of its own (``make run-cluster``).

    python -m siocluster.cluster                      # the example chat on http://127.0.0.1:8080/
    python -m siocluster.cluster --io-ports "9081 9082 9083" --app-nodes 3 --frontend-port 9080
    python -m siocluster.cluster --redis-url redis://db:6379/0 --app mychat.app:app \\
        --frontend mychat.frontend

It starts an embedded ``redis-server`` on a free port with a temporary directory (unless
``--redis-url`` is given), the policy server, the frontend-node (``python -m <frontend>
--host --port``), the io-nodes and the app-nodes (``python -m siocluster.appnode <app>``).
Every line a node writes is shown with the node's name in front (``io-8081 | ...``) and
the runner's own lines start with ``cluster |``; among them ``started <name> (pid N)`` for
each node and ``ready: open <url>`` once everything listens. A node that dies is reported
and the others keep running. Ctrl-C, SIGTERM or SIGHUP stop every node (SIGTERM, then
SIGKILL after ``--stop-timeout`` seconds), Redis last, and remove the temporary directory.
The policy server's port 843 needs root: without it the runner says so and uses 10843.

Other settings reach every node as ``SIOCLUSTER_*`` environment variables.
"""

import argparse
import errno
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import List, Optional

from . import defaults
from .connection import make_redis
from .embedded import EmbeddedRedis, check_redis
from .net import accepts, bind_error, browser_host, is_wildcard, parse_ports, primary_address

UNPRIVILEGED_POLICY_PORT = 10843
START_TIMEOUT = 30.0       # seconds to wait for every node to listen before saying so


class Stop(Exception):
    """Raised in the main thread by a stop signal."""


class Child:
    """One node: its process, and a thread copying its output line by line."""

    def __init__(self, name: str, args: List[str], port: Optional[int] = None):
        self.name = name
        self.args = args
        self.port = port
        self.proc: Optional[subprocess.Popen] = None
        self.reader: Optional[threading.Thread] = None

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class ClusterRunner:
    """Starts, watches and stops the nodes of one cluster; `main` is its command line.

    :param options: the parsed command line (see `argument_parser`).
    :param out: where the log lines go.

    ::

        runner = ClusterRunner(argument_parser().parse_args([...]))
        try:
            runner.start()
            runner.wait()        # until every node is gone; a signal raises `Stop`
        finally:
            runner.stop()
    """

    def __init__(self, options: argparse.Namespace, out=None):
        self.options = options
        self.out = out or sys.stdout
        self.children: List[Child] = []
        self.redis: Optional[Child] = None
        self.embedded: Optional[EmbeddedRedis] = None
        self.redis_url = options.redis_url
        self.exits: queue.Queue = queue.Queue()    # children that exited
        self._lock = threading.Lock()
        self._width = 8

    # ---- output --------------------------------------------------------------------------

    def say(self, text: str, name: str = "cluster") -> None:
        with self._lock:
            self.out.write(f"{name:<{self._width}} | {text}\n")
            self.out.flush()

    def _copy_output(self, child: Child) -> None:
        for line in child.proc.stdout:
            self.say(line.rstrip("\n"), child.name)
        child.proc.wait()
        self.exits.put(child)

    # ---- starting ------------------------------------------------------------------------

    @property
    def app_ports(self) -> List[int]:
        o = self.options
        return list(range(o.app_port, o.app_port + o.app_nodes))

    def start(self) -> None:
        """Start every node and wait until they listen; raises SystemExit with what to do."""
        o = self.options
        nodes = self._plan()
        self._width = max(len(c.name) for c in nodes + [Child("cluster", [])])
        if self.redis_url:      # first: a wrong URL is the mistake to hear of, not a port
            self.say(f"using {check_redis(self.redis_url)}, key prefix {o.prefix!r}")
        self._check_ports(nodes)
        if not self.redis_url:
            self._start_redis()
        for child in nodes:
            self._spawn(child)
        self._wait_ready(nodes)
        host = browser_host(o.host)
        self.say(f"ready: open http://{host}:{o.frontend_port}/ in a browser "
                 f"(io-nodes on {', '.join(str(p) for p in o.io_ports)}, {o.app_nodes} app-nodes, "
                 f"policy server on {o.policy_port}); Ctrl-C stops the cluster")
        for name, port in [("frontend", o.frontend_port), *((f"io-{p}", p) for p in o.io_ports),
                           *((f"app-{n}", p) for n, p in enumerate(self.app_ports, 1))]:
            self.say(f"metrics of {name}: http://{host}:{port}/metrics (and /healthz, /readyz)")

    def _plan(self) -> List[Child]:
        o = self.options
        py = [sys.executable]
        if o.policy_port < 1024 and bind_error(o.host, o.policy_port) == errno.EACCES:
            self.say(f"port {o.policy_port} needs root (or CAP_NET_BIND_SERVICE): the policy "
                     f"server listens on {UNPRIVILEGED_POLICY_PORT} instead; choose with "
                     f"POLICY_PORT=... (make) or --policy-port")
            o.policy_port = UNPRIVILEGED_POLICY_PORT
        common = ["--prefix", o.prefix]
        policy = Child("policy", py + ["-c", _POLICY_ENTRY, "--host", o.host,
                                       "--port", str(o.policy_port),
                                       "--allow-ports", ",".join(map(str, o.io_ports))],
                       o.policy_port)
        frontend = Child("frontend", py + ["-m", o.frontend, "--host", o.host,
                                           "--port", str(o.frontend_port), *common],
                         o.frontend_port)
        origins = o.cors_allowed_origins or ",".join(frontend_origins(
            o.host, o.frontend_port, o.public_host))
        io_nodes = []
        for port in o.io_ports:
            args = py + ["-m", "siocluster.ionode", "--host", o.host, "--port", str(port),
                         "--cors-allowed-origins", origins, *common]
            if o.public_host:
                args += ["--public-host", o.public_host]
            io_nodes.append(Child(f"io-{port}", args, port))
        # an app-node's port serves its /metrics, /healthz and /readyz
        app_nodes = [Child(f"app-{n}", py + ["-m", "siocluster.appnode", o.app, "--host", o.host,
                                             "--port", str(port), *common], port)
                     for n, port in enumerate(self.app_ports, 1)]
        return [policy, frontend, *io_nodes, *app_nodes]

    def _check_ports(self, nodes: List[Child]) -> None:
        ports = [c.port for c in nodes if c.port is not None]
        for child in nodes:
            if child.port is None:
                continue
            if ports.count(child.port) > 1:
                raise SystemExit(f"port {child.port} is given to two nodes: choose distinct "
                                 "--frontend-port, --io-ports and --policy-port")
            error = bind_error(self.options.host, child.port)
            if error is not None:
                why = {errno.EADDRINUSE: "is in use: stop what uses it, or choose other ports "
                                         "(make run-cluster FRONTEND_PORT=9080 "
                                         "IO_PORTS=\"9081 9082\" POLICY_PORT=10843)",
                       errno.EACCES: "needs root: choose a port above 1023",
                       errno.EADDRNOTAVAIL: "is not an address of this machine: fix --host "
                                            "(HOST=... for make)"}
                raise SystemExit(f"cannot start {child.name}: {self.options.host}:{child.port} "
                                 f"{why.get(error, os.strerror(error))}")

    def _start_redis(self) -> None:
        self.embedded = EmbeddedRedis()
        self.redis = Child("redis", self.embedded.args, self.embedded.port)
        self._width = max(self._width, len(self.redis.name))
        self.redis_url = self.embedded.url
        self._spawn(self.redis)
        self.embedded.wait_ready(self.redis.alive)
        self.say(f"embedded Redis at {self.redis_url} (data in {self.embedded.dir}, "
                 "removed at stop)")

    def _spawn(self, child: Child) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if child is not self.redis:
            env["SIOCLUSTER_REDIS_URL"] = self.redis_url
        # a session of its own: Ctrl-C in the terminal reaches the runner only, which then
        # stops the nodes in order (Redis last)
        child.proc = subprocess.Popen(child.args, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      env=env, text=True, errors="replace", bufsize=1,
                                      start_new_session=True)
        child.reader = threading.Thread(target=self._copy_output, args=(child,),
                                        name=f"output-{child.name}", daemon=True)
        child.reader.start()
        if child is not self.redis:
            self.children.append(child)
        self.say(f"started {child.name} (pid {child.pid})")

    def _wait_ready(self, nodes: List[Child]) -> None:
        """Wait until every node with a port accepts connections and the app-nodes have
        registered; a node that exits meanwhile fails the start."""
        from .state import ClusterState, Keys

        # the registry's keys as the nodes lay them out (on a Redis Cluster: in a hash tag)
        keys = Keys(self.options.prefix, cluster="+cluster" in self.redis_url.split("://")[0])
        state = ClusterState(make_redis(self.redis_url), keys)
        listening = [c for c in nodes if c.port is not None]
        deadline = time.monotonic() + START_TIMEOUT
        wanted_apps = sum(1 for c in nodes if c.port is None)
        while True:
            dead = [c for c in nodes + [self.redis] if c is not None and not c.alive()]
            if dead:
                raise SystemExit(f"{', '.join(c.name for c in dead)} exited at start; "
                                 "the lines above say why")
            listening = [c for c in listening if not accepts(self.options.host, c.port)]
            try:
                apps = len(state.nodes(role="app-node"))
            except Exception:
                apps = 0
            if not listening and apps >= wanted_apps:
                return
            if time.monotonic() > deadline:
                waiting = [c.name for c in listening]
                if apps < wanted_apps:
                    waiting.append(f"{wanted_apps - apps} app-node(s)")
                self.say(f"still waiting for {', '.join(waiting)} after {START_TIMEOUT:.0f}s; "
                         "see their lines above")
                return
            time.sleep(0.05)

    # ---- running -------------------------------------------------------------------------

    def wait(self) -> int:
        """Report nodes that exit, until none is left (returns 1 then)."""
        remaining = set(self.children + ([self.redis] if self.redis else []))
        while remaining:
            child = self.exits.get()
            remaining.discard(child)
            code = child.proc.returncode
            how = (f"was killed by {signal.Signals(-code).name}" if code < 0
                   else f"exited with code {code}")
            hint = (" every node needs it: stop the cluster (Ctrl-C) and start it again."
                    if child is self.redis else " the rest keeps running.")
            self.say(f"{child.name} (pid {child.pid}) {how} unexpectedly;{hint}")
        self.say("every node has exited")
        return 1

    # ---- stopping ------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the nodes, then Redis; safe to call twice, and after a failed start."""
        self._terminate([c for c in self.children if c.proc is not None])
        if self.redis is not None and self.redis.proc is not None:
            self._terminate([self.redis])
        for child in self.children + ([self.redis] if self.redis else []):
            if child.reader is not None:
                child.reader.join(timeout=5)
        if self.embedded is not None:
            self.embedded.remove()
            self.embedded = None

    def _terminate(self, children: List[Child]) -> None:
        running = [c for c in children if c.alive()]
        if not running:
            return
        self.say(f"stopping {', '.join(c.name for c in running)}")
        for child in running:
            try:
                child.proc.terminate()
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.options.stop_timeout
        for child in running:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"{child.name} (pid {child.pid}) did not stop in "
                         f"{self.options.stop_timeout:g}s: killing it")
                child.proc.kill()
                child.proc.wait()


# The policy server's entry point, without depending on the top-level policy_server.py
# being on the path: patch first, as every entry point does.
_POLICY_ENTRY = ("from gevent import monkey; monkey.patch_all(); "
                 "from siocluster.policy import main; main()")


def frontend_origins(host: str, port: int, public_host: Optional[str] = None) -> List[str]:
    """The origins a page served by the frontend-node has: what the io-nodes must allow."""
    hosts = ["localhost", "127.0.0.1"]
    if is_wildcard(host):
        hosts += [socket.gethostname(), *primary_address()]
    else:
        hosts.append(host)
    if public_host:
        hosts.append(public_host)
    return [f"http://{h}:{port}" for h in dict.fromkeys(hosts)]


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of nodes (0 or more)")
    return value


def argument_parser(environ=None) -> argparse.ArgumentParser:
    """The runner's flags; a few default to the ``SIOCLUSTER_*`` variables of ``environ``."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m siocluster.cluster",
        description="Run a siocluster cluster on this machine: an embedded Redis, the policy "
                    "server, a frontend-node, io-nodes and app-nodes, each a process.")
    parser.add_argument("--host", default=defaults.HTTP_HOST,
                        help="address every node listens on (default: %(default)s; 0.0.0.0 "
                             "serves other machines)")
    parser.add_argument("--frontend-port", type=int, default=defaults.HTTP_PORT,
                        help="the frontend-node's port (default: %(default)s)")
    parser.add_argument("--io-ports", type=parse_ports, default=[8081, 8082], metavar='"PORT ..."',
                        help="one io-node per port (default: \"8081 8082\")")
    parser.add_argument("--app-nodes", type=_count, default=2,
                        help="how many app-nodes (default: %(default)s)")
    parser.add_argument("--app-port", type=int, default=8091,
                        help="the first app-node's port for its metrics and health, the next "
                             "one's the port after (default: %(default)s)")
    parser.add_argument("--policy-port", type=int, default=defaults.POLICY_PORT,
                        help=f"the policy server's port (default: %(default)s; without root, "
                             f"{UNPRIVILEGED_POLICY_PORT} is used instead)")
    parser.add_argument("--redis-url", default=env.get("SIOCLUSTER_REDIS_URL") or None,
                        help="a Redis to use instead of starting an embedded redis-server "
                             "(default: SIOCLUSTER_REDIS_URL)")
    parser.add_argument("--prefix", default=env.get("SIOCLUSTER_PREFIX") or defaults.PREFIX,
                        help="prefix of the cluster's Redis keys (default: SIOCLUSTER_PREFIX, "
                             "else %(default)s)")
    parser.add_argument("--app", default="example_chat.app:app",
                        help="the App the app-nodes run (default: %(default)s)")
    parser.add_argument("--frontend", default="example_chat.frontend",
                        help="module run as `python -m MODULE --host --port` for the "
                             "frontend-node (default: %(default)s)")
    parser.add_argument("--public-host", default=env.get("SIOCLUSTER_PUBLIC_HOST") or None,
                        help="host browsers use to reach the io-nodes (default: "
                             "SIOCLUSTER_PUBLIC_HOST, else the host the browser used for the "
                             "page)")
    parser.add_argument("--cors-allowed-origins",
                        default=env.get("SIOCLUSTER_CORS_ALLOWED_ORIGINS") or None,
                        help="origins the io-nodes accept, comma-separated (default: "
                             "SIOCLUSTER_CORS_ALLOWED_ORIGINS, else the frontend-node's: "
                             "localhost, 127.0.0.1 and this machine's name and address)")
    parser.add_argument("--stop-timeout", type=float, default=10.0,
                        help="seconds a node has to stop before it is killed "
                             "(default: %(default)s)")
    return parser


def main(argv=None) -> int:
    options = argument_parser().parse_args(argv)
    runner = ClusterRunner(options)

    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def again(signum, frame):
        runner.say(f"already stopping (each node has {options.stop_timeout:g}s before it is "
                   "killed)")

    def on_signal(signum, frame):
        for sig in stop_signals:
            signal.signal(sig, again)
        raise Stop(signal.Signals(signum).name)

    for sig in stop_signals:
        signal.signal(sig, on_signal)
    code = 0
    try:
        runner.start()
        code = runner.wait()
    except Stop as exc:
        runner.say(f"{exc}: stopping the cluster")
    except SystemExit as exc:
        if isinstance(exc.code, str):
            runner.say(exc.code)
            code = 1
        else:
            code = exc.code or 0
    finally:
        for sig in stop_signals:
            signal.signal(sig, again)
        runner.stop()
    runner.say("stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
