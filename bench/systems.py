"""The processes of a bench run: its own redis-server (or Redis Cluster, `RedisCluster`), the
systems measured, the generators.

Everything runs as a subprocess on 127.0.0.1 and free ports, with its output in a log file
that an error message quotes. Every child gets the open-files limit raised to the hard
limit and dies with the bench (Linux's parent-death signal), so a bench killed by Ctrl-C
leaves nothing behind::

    with Redis.start(logdir) as redis:
        system = Cluster.start(redis, logdir, io_nodes=2, app_nodes=1)
        generators = Generators.start(3, logdir)
        generators.each("connect", [{"urls": system.urls, ...}, ...])
        ...
        generators.stop(); system.stop()
"""

import ctypes
import json
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from typing import Dict, List, Optional, Union

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PR_SET_PDEATHSIG = 1


class BenchError(RuntimeError):
    """Something the bench needs did not start or answer; the message says what to check."""


def raise_file_limit() -> int:
    """Raise the open-files limit to the hard limit (every connection is a file)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _child_setup() -> None:
    raise_file_limit()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass     # not Linux: children then outlive a killed bench, as they would anyway


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: "Proc", timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{proc.name} did not listen on port {port} in {timeout}s; "
                     f"its log:\n{proc.tail()}")


class Proc:
    """A child process with its output in ``<logdir>/<name>.log``."""

    def __init__(self, name: str, args: List[str], logdir: str, stdin=None, stdout=None,
                 env: Optional[Dict[str, str]] = None):
        self.name = name
        self.log_path = os.path.join(logdir, f"{name}.log")
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            args, cwd=ROOT, stdin=stdin, stdout=stdout if stdout is not None else self.log,
            stderr=self.log, preexec_fn=_child_setup,
            env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})
        self.pid = self.popen.pid

    def check(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise BenchError(f"{self.name} exited with code {code}; its log:\n{self.tail()}")

    def tail(self, lines: int = 25) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def terminate(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self.log.close()


def python(module: str, *args: str) -> List[str]:
    return [sys.executable, "-m", module, *args]


# ---- Redis ------------------------------------------------------------------------------

class Redis:
    """The bench's own redis-server on a free port, never one already running."""

    def __init__(self, proc: Proc, port: int, datadir: str):
        self.proc, self.port, self.datadir = proc, port, datadir
        self.url = f"redis://127.0.0.1:{port}/0"
        import redis

        self.client = redis.Redis(port=port, decode_responses=True)

    @classmethod
    def start(cls, logdir: str, tag: str = "") -> "Redis":
        exe = shutil.which("redis-server")
        if exe is None:
            raise BenchError("redis-server is not installed: run `make install` (it installs "
                             "it) or `apt-get install redis-server`")
        port = free_port()
        name = f"redis-server-{tag.replace(' ', '-')}" if tag else "redis-server"
        datadir = os.path.join(logdir, f"{name}-data")
        os.makedirs(datadir, exist_ok=True)
        proc = Proc(name, [exe, "--port", str(port), "--bind", "127.0.0.1",
                                     "--save", "", "--appendonly", "no", "--dir", datadir,
                                     "--protected-mode", "no", "--maxclients", "20000"], logdir)
        wait_for_port(port, proc)
        return cls(proc, port, datadir)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def pids(self) -> List[int]:
        """Its redis-server processes: this one."""
        return [self.proc.pid]

    def version(self) -> str:
        return self.client.info("server")["redis_version"]

    def commandstats(self) -> Dict[str, int]:
        """Calls per command since the last reset (``INFO commandstats``)."""
        stats = self.client.info("commandstats")
        return {name.split("_", 1)[1]: int(value["calls"]) for name, value in stats.items()}

    def flush(self) -> None:
        self.client.flushall()
        self.client.config_resetstat()

    def stop(self) -> None:
        self.proc.stop()
        shutil.rmtree(self.datadir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class _SubprocessWithSetup:
    """The subprocess module, but every Popen gets the bench's `_child_setup`."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name: str):
        return getattr(self._module, name)

    def Popen(self, *args, **kwargs):  # noqa: N802 - subprocess's name
        return self._module.Popen(*args, preexec_fn=_child_setup, **kwargs)


def _cluster_nodes_class():
    """siocluster's `EmbeddedRedisCluster` whose redis-servers die with the bench as every
    other child of it does (it spawns them itself, without a parent-death signal)."""
    from siocluster import embedded

    class ClusterNodes(embedded.EmbeddedRedisCluster):
        def _spawn(self, port: int) -> None:
            real = embedded.subprocess
            embedded.subprocess = _SubprocessWithSetup(real)
            try:
                super()._spawn(port)
            finally:
                embedded.subprocess = real

    return ClusterNodes


class RedisCluster:
    """The bench's own Redis Cluster: ``masters`` masters and no replicas, each a
    redis-server on free ports (siocluster's `EmbeddedRedisCluster`), never one already
    running. It offers what the scenarios read of a `Redis`, over all the masters
    (``pids``, ``commandstats``), and per master (``master_pids``,
    ``master_commandstats``), so a window can show how the load spread. ``url`` is the
    ``redis+cluster://`` URL siocluster's nodes are given; ``client`` siocluster's cluster
    client. Each node's log is copied to the bench's log directory when it stops."""

    def __init__(self, nodes, logdir: str, name: str):
        import redis

        from siocluster.connection import make_redis

        self.nodes, self.logdir, self.name = nodes, logdir, name
        self.url = nodes.url
        self.ports: List[int] = nodes.masters()
        self.clients = {port: redis.Redis(port=port, decode_responses=True)
                        for port in self.ports}
        self.client = make_redis(self.url)

    @classmethod
    def start(cls, logdir: str, masters: int = 3, tag: str = "") -> "RedisCluster":
        for exe, package in (("redis-server", "redis-server"), ("redis-cli", "redis-tools")):
            if shutil.which(exe) is None:
                raise BenchError(f"{exe} is not installed: run `make install` (it installs "
                                 f"it) or `apt-get install {package}`")
        name = f"redis-cluster-{tag.replace(' ', '-')}" if tag else "redis-cluster"
        try:
            nodes = _cluster_nodes_class()(masters=masters, replicas=0).start()
        except (RuntimeError, SystemExit) as exc:
            raise BenchError(f"the Redis Cluster of {masters} masters did not start: {exc}") \
                from None
        try:
            return cls(nodes, logdir, name)
        except BaseException:
            nodes.stop()
            raise

    @property
    def pids(self) -> List[int]:
        """The masters' redis-server processes."""
        return list(self.master_pids.values())

    @property
    def master_pids(self) -> Dict[int, int]:
        """Each master's redis-server process, by port."""
        return {port: self.nodes.procs[port].pid for port in self.ports}

    def version(self) -> str:
        return self.clients[self.ports[0]].info("server")["redis_version"]

    def master_commandstats(self) -> Dict[int, Dict[str, int]]:
        """Calls per command since the last reset, of each master by port."""
        out = {}
        for port, client in self.clients.items():
            stats = client.info("commandstats")
            out[port] = {name.split("_", 1)[1]: int(value["calls"])
                         for name, value in stats.items()}
        return out

    @staticmethod
    def summed(per_master: Dict[int, Dict[str, int]]) -> Dict[str, int]:
        total: Dict[str, int] = {}
        for calls in per_master.values():
            for name, count in calls.items():
                total[name] = total.get(name, 0) + count
        return total

    def commandstats(self) -> Dict[str, int]:
        """Calls per command since the last reset, over all the masters."""
        return self.summed(self.master_commandstats())

    def flush(self) -> None:
        for client in self.clients.values():
            client.flushall()
            client.config_resetstat()

    def check(self) -> None:
        for port, proc in self.nodes.procs.items():
            if proc.poll() is not None:
                raise BenchError(f"the redis-server of the Redis Cluster on port {port} "
                                 f"exited with code {proc.returncode}")

    def stop(self) -> None:
        for client in (self.client, *self.clients.values()):
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a client of a server going away
                pass
        for proc in self.nodes.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.nodes.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass        # `EmbeddedRedisCluster.stop` kills it
        for port in self.nodes.procs:
            log = os.path.join(self.nodes.dir, str(port), "redis.log")
            if os.path.exists(log):
                shutil.copyfile(log, os.path.join(self.logdir, f"{self.name}-{port}.log"))
        self.nodes.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# ---- the systems measured ---------------------------------------------------------------

def connections_on(ports) -> int:
    """TCP connections still open (established, or closed by the peer only) on the
    local ``ports`` of this machine, from /proc/net/tcp."""
    wanted = {f"{port:04X}" for port in ports}
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    # local address "0100007F:1F90", state 01 established, 08 close-wait
                    if fields[1].rpartition(":")[2] in wanted and fields[3] in ("01", "08"):
                        count += 1
        except OSError:
            pass
    return count


class System:
    """A system under test: the URLs clients connect to and its processes by role."""

    def __init__(self, name: str, urls: List[str], procs: Dict[str, List[Proc]]):
        self.name, self.urls, self.procs = name, urls, procs
        self.ports = [int(url.rsplit(":", 1)[1]) for url in urls]

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until the servers have closed every client connection on their side too
        (stopping a server while it still handles a crowd of disconnects would measure its
        shutdown, and the next scenario would meet the leftovers)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if connections_on(self.ports) == 0:
                return True
            time.sleep(0.05)
        return False

    def pids(self) -> Dict[str, List[int]]:
        return {role: [p.pid for p in procs] for role, procs in self.procs.items()}

    def check(self) -> None:
        for procs in self.procs.values():
            for proc in procs:
                proc.check()

    def stop(self) -> None:
        everyone = [proc for procs in self.procs.values() for proc in procs]
        for proc in everyone:
            proc.terminate()
        for proc in everyone:
            proc.stop()


def start_cluster(redis: Union[Redis, RedisCluster], logdir: str, io_nodes: int = 2,
                  app_nodes: int = 1, workers: Optional[int] = 32, tag: str = "cluster",
                  app: str = "bench.apps:app", rate_limit: Optional[float] = 0,
                  io_options: Optional[List[str]] = None, name: str = "siocluster") -> System:
    """siocluster: io-nodes and app-nodes as their users run them (``python -m``), the
    app-nodes running ``app``, on ``redis`` (one redis-server, or a `RedisCluster`: then
    with siocluster's default shards on a cluster); ``workers`` and ``rate_limit`` None leave
    siocluster's defaults, ``io_options`` are more flags for the io-nodes; ``name`` is the
    system's in the results."""
    from siocluster.connection import is_cluster
    from siocluster.state import ClusterState, Keys

    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    common = ["--redis-url", redis.url, "--prefix", prefix]
    if rate_limit is not None:
        common += ["--rate-limit", f"{rate_limit:g}"]
    io_procs, urls = [], []
    for n in range(io_nodes):
        port = free_port()
        io_procs.append(Proc(f"{tag}-io-node-{n}", python(
            "siocluster.ionode", "--host", "127.0.0.1", "--port", str(port), *common,
            *(io_options or [])), logdir))
        urls.append(f"ws://127.0.0.1:{port}")
    app_args = ["--workers", str(workers)] if workers is not None else []
    app_procs = [Proc(f"{tag}-app-node-{n}", python(
        "siocluster.appnode", app, *app_args, *common), logdir)
        for n in range(app_nodes)]
    for proc, url in zip(io_procs, urls):
        wait_for_port(int(url.rsplit(":", 1)[1]), proc)
    # the registry of nodes: the same keys whatever the number of shards
    state = ClusterState(redis.client, Keys(prefix, cluster=is_cluster(redis.client)))
    deadline = time.monotonic() + 30
    while len(state.nodes(role="app-node")) < app_nodes:
        for proc in app_procs:
            proc.check()
        if time.monotonic() > deadline:
            raise BenchError("the app-nodes did not register in 30s; their logs:\n"
                             + "\n".join(p.tail() for p in app_procs))
        time.sleep(0.05)
    return System(name, urls, {"io-node": io_procs, "app-node": app_procs})


def start_run_cluster(redis: Union[Redis, RedisCluster], logdir: str, tag: str = "chat",
                      name: str = "siocluster") -> System:
    """siocluster as ``make run-cluster`` runs it (``python -m siocluster.cluster``'s
    defaults): its io-nodes, app-nodes and app, with the flags the runner gives them and
    siocluster's defaults for the rest (app-node workers, rate limit, shards), on one
    redis-server or on a `RedisCluster` (as ``make run-cluster
    REDIS_URL=redis+cluster://...`` runs it). The runner's policy server and frontend-node
    are left out: no chat message goes through them."""
    from siocluster.cluster import argument_parser, frontend_origins

    options = argument_parser({}).parse_args([])
    origins = ",".join(frontend_origins(options.host, options.frontend_port))
    return start_cluster(redis, logdir, io_nodes=len(options.io_ports),
                         app_nodes=options.app_nodes, workers=None, tag=tag, app=options.app,
                         rate_limit=None, io_options=["--cors-allowed-origins", origins],
                         name=name)


def start_baseline(logdir: str, processes: int = 1, redis: Optional[Redis] = None,
                   tag: str = "single", module: str = "bench.baseline") -> System:
    """python-socketio: one process, or ``processes`` sharing a ``RedisManager``;
    ``module`` is the server (`bench.baseline`, or `bench.chat_baseline`: it needs Redis)."""
    procs, urls = [], []
    extra = ["--redis-url", redis.url, "--channel", f"bench-{uuid.uuid4().hex[:8]}"] \
        if redis is not None else []
    for n in range(processes):
        port = free_port()
        procs.append(Proc(f"{tag}-{n}", python(module, "--port", str(port), *extra),
                          logdir))
        urls.append(f"ws://127.0.0.1:{port}")
    for proc, url in zip(procs, urls):
        wait_for_port(int(url.rsplit(":", 1)[1]), proc)
    name = "RedisManager" if redis is not None else "single process"
    return System(name, urls, {"server": procs})


NODE_DIR = os.path.join(ROOT, "bench", "node")
NODE_PACKAGES = ("socket.io", "@socket.io/redis-adapter", "redis")


def node_ready(logdir: str, timeout: float = 300.0) -> str:
    """Install the Node baseline's packages (bench/node/package.json, exact versions in its
    package-lock.json) from the npm registry into bench/node/node_modules, unless they are
    there already; returns ``node``'s path, or raises `BenchError` saying what is missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise BenchError(f"{'node' if node is None else 'npm'} is not installed (Debian: "
                         f"apt-get install nodejs npm)")
    installed = os.path.join(NODE_DIR, "node_modules", ".package-lock.json")
    lock = os.path.join(NODE_DIR, "package-lock.json")
    if not (os.path.exists(installed) and os.path.getmtime(installed) >= os.path.getmtime(lock)):
        log = os.path.join(logdir, "npm-ci.log")
        try:
            with open(log, "wb") as out:
                done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                                      cwd=NODE_DIR, stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"npm ci in bench/node took more than {timeout:g}s") from None
        if done.returncode != 0:
            with open(log, errors="replace") as f:
                # the first lines say why; the rest is npm's usage text
                lines = [ln.replace("npm error", "").strip() for ln in f.read().splitlines()]
            raise BenchError(f"npm ci in bench/node failed (code {done.returncode}): "
                             + " / ".join([ln for ln in lines if ln][:3]))
    check = subprocess.run([node, "-e", "".join(f"require({name!r});" for name in NODE_PACKAGES)],
                           cwd=NODE_DIR, capture_output=True, text=True, timeout=60)
    if check.returncode != 0:
        raise BenchError("bench/node's packages do not load: "
                         + (check.stderr.strip().splitlines() or ["?"])[-1])
    return node


def node_versions(node: str) -> Dict[str, Optional[str]]:
    """The versions of node and of the packages bench/node/node_modules holds."""
    versions: Dict[str, Optional[str]] = {}
    try:
        versions["node"] = subprocess.run([node, "--version"], capture_output=True, text=True,
                                          timeout=30).stdout.strip().lstrip("v") or None
    except OSError:
        versions["node"] = None
    for name in NODE_PACKAGES:
        try:
            with open(os.path.join(NODE_DIR, "node_modules", name, "package.json")) as f:
                versions[name] = json.load(f).get("version")
        except (OSError, ValueError):
            versions[name] = None
    return versions


def start_node(redis: Redis, logdir: str, node: str, processes: int = 2,
               tag: str = "node") -> System:
    """Node's socket.io with the Redis adapter (bench/node/chat.js), ``processes`` of it
    sharing ``redis``; `node_ready` first."""
    procs, urls = [], []
    for n in range(processes):
        port = free_port()
        procs.append(Proc(f"{tag}-{n}", [node, os.path.join(NODE_DIR, "chat.js"), "--port",
                                         str(port), "--redis-url", redis.url], logdir))
        urls.append(f"ws://127.0.0.1:{port}")
    for proc, url in zip(procs, urls):
        wait_for_port(int(url.rsplit(":", 1)[1]), proc)
    return System("Node socket.io", urls, {"server": procs})


# ---- the load generator -----------------------------------------------------------------

class Generators:
    """Load generator processes (`bench.loadgen`) driven over their stdin and stdout."""

    def __init__(self, procs: List[Proc]):
        self.procs = procs

    @classmethod
    def start(cls, count: int, logdir: str) -> "Generators":
        procs = [Proc(f"loadgen-{n}", python("bench.loadgen"), logdir,
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE) for n in range(count)]
        return cls(procs)

    @property
    def pids(self) -> List[int]:
        return [p.pid for p in self.procs]

    def __len__(self) -> int:
        return len(self.procs)

    def run(self, op: str, timeout: float = 300.0, **kwargs) -> List[dict]:
        """The same command to every generator; their answers, in order."""
        return self.each(op, [kwargs] * len(self.procs), timeout)

    def each(self, op: str, commands: List[dict], timeout: float = 300.0) -> List[dict]:
        """One command per generator, all at once; their answers, in order."""
        self.send(op, commands)
        return self.collect(op, timeout)

    def send(self, op: str, commands: List[dict]) -> None:
        for proc, command in zip(self.procs, commands):
            proc.popen.stdin.write((json.dumps({"op": op, **command}) + "\n").encode())
            proc.popen.stdin.flush()

    def collect(self, op: str, timeout: float = 300.0) -> List[dict]:
        """The answers to what `send` asked, in order."""
        deadline = time.monotonic() + timeout
        replies = []
        for proc in self.procs:
            stream = proc.popen.stdout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BenchError(f"{proc.name} did not answer {op!r} in {timeout}s; "
                                     f"its log:\n{proc.tail()}")
                ready, _, _ = select.select([stream], [], [], min(remaining, 1.0))
                if ready:
                    break
                proc.check()
            line = stream.readline()
            if not line:
                proc.check()
                raise BenchError(f"{proc.name} closed its output; its log:\n{proc.tail()}")
            reply = json.loads(line)
            if "error" in reply:
                raise BenchError(f"{proc.name}: {reply['error']}; its log:\n{proc.tail()}")
            replies.append(reply)
        return replies

    def stop(self) -> None:
        for proc in self.procs:
            if proc.popen.poll() is None:
                try:
                    proc.popen.stdin.write(b'{"op": "quit"}\n')
                    proc.popen.stdin.flush()
                except OSError:
                    pass
        for proc in self.procs:
            try:
                proc.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
            proc.stop()
