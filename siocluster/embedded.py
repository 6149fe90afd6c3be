"""The Redis under a cluster started by `siocluster.cluster`: a ``redis-server`` of its own, or
one given with ``--redis-url`` that is checked before any node starts.

The runner spawns, watches and stops the embedded ``redis-server`` as it does its nodes (its
lines show as ``redis | ...``); this module says how to start it, waits until it answers
and removes its data. Every failure is a SystemExit saying what to do.

`EmbeddedRedisCluster` is the tests' real Redis Cluster: it spawns its nodes itself, forms
the cluster with ``redis-cli`` and can kill a master to watch a replica take over.
"""

import os
import random
import shutil
import subprocess
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

import redis

from .connection import make_redis, parse_redis_url, refuse_cluster_node
from .errors import ConfigError
from .net import bind_error, free_port

START_TIMEOUT = 10.0    # seconds a new redis-server has to answer


class EmbeddedRedis:
    """A ``redis-server`` on a free port of 127.0.0.1 that saves nothing, its directory a
    temporary one: run `args`, then `wait_ready`; `remove` once it has stopped."""

    def __init__(self):
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server is not installed: run `make install` (it installs "
                             "it), or `apt-get install redis-server`, or point the cluster at "
                             "a running Redis with --redis-url (REDIS_URL=... for make)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="siocluster-redis-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", self.dir, "--protected-mode", "no"]

    def wait_ready(self, alive: Callable[[], bool]) -> None:
        """Return once it answers a ping; ``alive()`` tells whether its process still runs."""
        client = make_redis(self.url, {"socket_connect_timeout": 0.5})
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                client.ping()
                break
            except Exception as exc:  # OSError, or redis-py's ConnectionError while it starts
                error = exc
            if not alive():
                raise SystemExit("redis-server exited at start; its lines above say why")
            if time.monotonic() > deadline:
                raise SystemExit(f"redis-server did not answer in {START_TIMEOUT}s: {error}")
            time.sleep(0.05)
        client.close()

    def remove(self) -> None:
        """Delete its data directory."""
        shutil.rmtree(self.dir, ignore_errors=True)


def check_redis(url: str) -> str:
    """Make sure the Redis at ``url`` answers before any node is started on it (on a Redis
    Cluster: that it serves every slot; a plain URL: that it names no cluster node); returns
    what it is, for the runner's line: ``Redis at ...`` or ``Redis Cluster at ... (N masters)``."""
    scheme, _, rest = url.partition("://")
    shown = f"{scheme}://{rest.rpartition('@')[2]}"     # no secrets
    fix = "fix --redis-url (REDIS_URL=... for make), or leave it out to use an embedded " \
          "redis-server."
    try:
        cluster = "seeds" in parse_redis_url(url)
        client = make_redis(url)
    except ConfigError as exc:
        raise SystemExit(str(exc))
    except RuntimeError as exc:     # a Redis Cluster that cannot be reached: says why
        raise SystemExit(f"{exc}; or {fix}")
    except Exception as exc:
        raise SystemExit(f"cannot reach Redis at {shown}: {exc}. Start it, or {fix}")
    try:
        if cluster:
            info = client.cluster_info()
            masters = len(client.get_primaries())
        else:
            client.ping()
            refuse_cluster_node(client, url)
    except RuntimeError as exc:     # a plain URL naming a node of a Redis Cluster
        raise SystemExit(str(exc))
    except Exception as exc:
        if cluster:
            raise SystemExit(f"REDIS_URL: the Redis Cluster at {shown} does not answer ({exc}): "
                             f"check it with redis-cli --cluster check host:port, or {fix}")
        raise SystemExit(f"cannot reach Redis at {shown}: {exc}. Start it, or {fix}")
    finally:
        client.close()
    if cluster:
        if info.get("cluster_state") != "ok":
            raise SystemExit(
                f"REDIS_URL: the Redis Cluster at {shown} does not serve every slot "
                f"(cluster_state:{info.get('cluster_state')}, {info.get('cluster_slots_ok')} of "
                f"{SLOTS} slots served): a master is down without a replica to take over. Check "
                f"it with redis-cli --cluster check host:port, or {fix}")
        return f"Redis Cluster at {shown} ({masters} masters)"
    return f"Redis at {shown}"


SLOTS = 16384           # hash slots of a Redis Cluster, all of which must have a master
CLUSTER_START_TIMEOUT = 60.0    # seconds a new cluster has to form, every replica in sync


def _program(name: str, package: str) -> str:
    """The path of ``name``, or a SystemExit saying how to install it."""
    exe = shutil.which(name)
    if exe is None:
        raise SystemExit(f"{name} is not installed: run `make install` (it installs it), or "
                         f"`apt-get install {package}`")
    return exe


def cluster_ports(count: int) -> List[int]:
    """``count`` ports P of 127.0.0.1 free now with their cluster bus port P + 10000: P in
    10000-19999, so that both stay below the ephemeral ports of Linux and macOS (32768 and up)
    that outgoing connections could take meanwhile."""
    found: List[int] = []
    for port in random.sample(range(10000, 20000), 500):
        if bind_error("127.0.0.1", port) is None and bind_error("127.0.0.1", port + 10000) is None:
            found.append(port)
            if len(found) == count:
                return found
    raise RuntimeError(f"no {count} free pairs of ports P and P + 10000 found on 127.0.0.1")


class _NotYet(Exception):
    """What a check polled by `EmbeddedRedisCluster._wait` still waits for."""


class EmbeddedRedisCluster:
    """A real Redis Cluster on free ports of 127.0.0.1, for the tests: ``masters`` masters with
    ``replicas`` replicas each, one ``redis-server`` process a node (spawned here, unlike the
    runner's `EmbeddedRedis`), each saving nothing in a temporary directory of its own, where
    its lines go to ``redis.log``.

    `start` forms the cluster with ``redis-cli --cluster create`` and returns once every node
    says ``cluster_state:ok`` with all 16384 slots assigned and every replica is in sync with
    its master; `stop` ends every process and removes the directories. `kill` and
    `wait_failover` play a master's crash. Every check asks single nodes with plain
    ``redis.Redis`` clients, never a cluster client. A missing program is a SystemExit saying
    what to install; a cluster that does not form or fail over in time, a RuntimeError.
    """

    def __init__(self, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 1500):
        self.server = _program("redis-server", "redis-server")
        self.cli = _program("redis-cli", "redis-tools")
        self.master_count, self.replicas, self.node_timeout_ms = masters, replicas, node_timeout_ms
        self.ports: List[int] = []
        self.procs: Dict[int, subprocess.Popen] = {}
        self.ids: Dict[int, str] = {}           # port -> cluster node id
        self.seeds: List[int] = []              # the masters once it formed: `url`'s ports
        self.dir = ""
        self.orphans: Dict[int, List[int]] = {}     # a killed master -> its replicas then

    @property
    def url(self) -> str:
        """The siocluster URL of the cluster, its masters at `start` as the seeds."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.seeds)

    def start(self) -> "EmbeddedRedisCluster":
        """Spawn the nodes, form the cluster and wait until it serves every slot."""
        self.dir = tempfile.mkdtemp(prefix="siocluster-redis-cluster-")
        try:
            self.ports = cluster_ports(self.master_count * (1 + self.replicas))
            for port in self.ports:
                self._spawn(port)
            for port in self.ports:
                self._wait(lambda port=port: self._ask(port, "PING"), START_TIMEOUT,
                           f"redis-server on port {port} did not answer")
            create = subprocess.run(
                [self.cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                timeout=CLUSTER_START_TIMEOUT)
            if create.returncode != 0:
                raise RuntimeError("redis-cli --cluster create failed: "
                                   + (create.stdout + create.stderr)[-2000:])
            self.ids = {port: self._ask(port, "CLUSTER", "MYID") for port in self.ports}
            self._wait(self._formed, CLUSTER_START_TIMEOUT, "the Redis Cluster did not form")
        except BaseException:
            self.stop()
            raise
        self.seeds = self.masters()
        return self

    def stop(self) -> None:
        """End every node (SIGTERM, then SIGKILL after 10s) and remove their directories."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def master_of_slot(self, slot: int) -> int:
        """The port of the master serving ``slot``, as a live node sees it."""
        for start, end, master, *_ in self._any("CLUSTER", "SLOTS"):
            if int(start) <= slot <= int(end):
                return int(master[1])
        raise RuntimeError(f"no master serves slot {slot}")

    def masters(self) -> List[int]:
        """The ports of the masters as a live node sees them, less any it flags as failing
        and any whose process has exited."""
        live = self._live()
        return sorted(node["port"] for node in self._nodes() if node["port"] in live
                      and "master" in node["flags"] and not node["flags"] & {"fail", "fail?"})

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port`` (its replicas are noted for `wait_failover`)."""
        node_id = self.ids[port]
        self.orphans[port] = [node["port"] for node in self._nodes() if node["master"] == node_id]
        self.procs[port].kill()
        self.procs[port].wait()

    def wait_failover(self, old_port: int, timeout: float = 30) -> int:
        """Wait until a replica of the master killed on ``old_port`` serves its slots and every
        live node says ``cluster_state:ok`` again; return that replica's port."""
        replicas = self.orphans.get(old_port) or [
            node["port"] for node in self._nodes() if node["master"] == self.ids[old_port]]
        if not replicas:
            raise RuntimeError(f"the master on port {old_port} has no replica to fail over to")

        def promoted() -> int:
            for port in self._live():
                self._state_ok(port)
            for node in self._nodes():
                if node["port"] in replicas and "master" in node["flags"] and node["slots"]:
                    return node["port"]
            raise _NotYet(f"none of its replicas {replicas} is a master yet")

        return self._wait(promoted, timeout, f"no replica of the master on {old_port} took over")

    def _spawn(self, port: int) -> None:
        node_dir = os.path.join(self.dir, str(port))
        os.mkdir(node_dir)
        with open(os.path.join(node_dir, "redis.log"), "wb") as log:
            self.procs[port] = subprocess.Popen(
                [self.server, "--port", str(port), "--bind", "127.0.0.1",
                 "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                 "--cluster-node-timeout", str(self.node_timeout_ms), "--save", "",
                 "--appendonly", "no", "--protected-mode", "no", "--dir", node_dir,
                 # a replica's first sync starts at once, not 5s later (Redis 7's default)
                 "--repl-diskless-sync-delay", "0"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def _live(self) -> List[int]:
        return [port for port, proc in self.procs.items() if proc.poll() is None]

    def _ask(self, port: int, *command: Any) -> Any:
        """One command to the node on ``port``, on a connection of its own."""
        client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True,
                             socket_connect_timeout=0.5, socket_timeout=5)
        try:
            return client.execute_command(*command)
        finally:
            client.close()

    def _any(self, *command: Any) -> Any:
        """One command to the first live node that answers it."""
        error: Exception = RuntimeError("no node of the cluster is running")
        for port in self._live():
            try:
                return self._ask(port, *command)
            except redis.RedisError as exc:
                error = exc
        raise error

    def _nodes(self, port: Optional[int] = None) -> List[Dict[str, Any]]:
        """CLUSTER NODES of the node on ``port`` (else of a live node), a dict a line: port,
        id, flags, master id, slots."""
        command = ("CLUSTER", "NODES")
        text = self._any(*command) if port is None else self._ask(port, *command)
        nodes = []
        for line in text.splitlines():
            node_id, address, flags, master, *rest = line.split()
            nodes.append({"id": node_id, "port": int(address.split("@")[0].rsplit(":", 1)[1]),
                          "flags": set(flags.split(",")), "master": master, "slots": rest[4:]})
        return nodes

    def _state_ok(self, port: int) -> None:
        info = dict(line.split(":", 1) for line in
                    self._ask(port, "CLUSTER", "INFO").splitlines() if ":" in line)
        if info.get("cluster_state") != "ok" or info.get("cluster_slots_assigned") != str(SLOTS):
            raise _NotYet(f"node {port}: cluster_state:{info.get('cluster_state')}, "
                          f"{info.get('cluster_slots_assigned')} slots assigned")

    def _formed(self) -> bool:
        """Every node sees all the others, every replica as one, and every slot served; every
        replica is in sync with its master."""
        for port in self.ports:
            self._state_ok(port)
            nodes = self._nodes(port)
            replicas = sum("slave" in node["flags"] for node in nodes)
            if len(nodes) != len(self.ports) or replicas != self.master_count * self.replicas:
                raise _NotYet(f"node {port} knows {len(nodes)} of {len(self.ports)} nodes, "
                              f"{replicas} of them replicas")
            replication = self._ask(port, "INFO", "replication")
            if replication["role"] == "slave" and replication["master_link_status"] != "up":
                raise _NotYet(f"replica {port} is not in sync with its master yet")
        return True

    def _wait(self, check: Callable[[], Any], timeout: float, message: str) -> Any:
        """Poll ``check`` until it returns, not raising `_NotYet` or a Redis error; a node
        exiting unasked or ``timeout`` seconds passing is a RuntimeError."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return check()
            except (_NotYet, redis.RedisError) as exc:
                reason = str(exc)
            for port, proc in self.procs.items():
                if proc.poll() is not None and port not in self.orphans:
                    with open(os.path.join(self.dir, str(port), "redis.log"), "rb") as log:
                        tail = log.read().decode(errors="replace")[-1500:]
                    raise RuntimeError(f"{message}: redis-server on port {port} exited:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{message} in {timeout}s: {reason}")
            time.sleep(0.1)
