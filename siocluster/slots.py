"""Redis Cluster: where keys live, and round trips routed to the masters that hold them.

On one Redis (or one Sentinel-watched master) every key is in the same place. On a Redis
Cluster each key is in one of 16,384 slots, the CRC16 of its hash tag (the part between
the first ``{`` and ``}``), each slot served by one master; a script, a MULTI block or a
multi-key command may touch the keys of one slot only. siocluster lays its keys out in
**shards** (`shard_tags`): every key about one client (its queue, session, record, rooms)
and each shard's ready list, processing lists and command stream share the shard's tag, so
the inbox and stream scripts stay in one slot, and the shards' tags are spread over the
slot space so that the masters share the load.

`ClusterClient` is redis-py's cluster client whose pipelines (`RoutedPipeline`) and
`connection.Direct` round trips go through a `Router`: each command is sent to the master
of its slot, one write per master, the masters' replies read back in the order the
commands were given. A command a master answers with MOVED or ASK (a failover, a slot
moved) was not run there: the router learns the new layout and sends it again. A master
that cannot be reached, or a cluster that says it is down, raises a redis-py
``ConnectionError``, which every loop already treats as Redis being away::

    client = make_cluster_client([("10.0.0.1", 7000)], {"decode_responses": True})
    pipe = client.pipeline(transaction=False)
    pipe.set("a", 1); pipe.set("b", 2)           # two slots, maybe two masters
    pipe.execute()
"""

from typing import Dict, List, Optional, Sequence, Tuple

from redis.client import Pipeline
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

SLOTS = 16384
RETRIES = 3         # times a command answered MOVED/ASK is sent again after a new look


def shard_tags(prefix: str, count: int) -> List[str]:
    """Hash tags for ``count`` shards, the k-th in the k-th ``count``-th of the slot space:
    masters that own equal runs of slots (as ``redis-cli --cluster create`` and
    ``--cluster rebalance`` leave them) hold equal numbers of shards."""
    tags = []
    for k in range(count):
        low, high = k * SLOTS // count, (k + 1) * SLOTS // count
        n = 0
        while True:
            tag = f"{prefix}-{k}" if n == 0 else f"{prefix}-{k}.{n}"
            if low <= key_slot(tag.encode()) < high:
                break
            n += 1
        tags.append(tag)
    return tags


def _encoded(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogateescape")


def slot_of(args: Sequence) -> Optional[int]:
    """The slot of a command's keys (its first key: every command siocluster pipelines
    touches one slot), None for a command without keys."""
    name = str(args[0]).upper()
    if name in ("EVALSHA", "EVAL", "FCALL"):
        return key_slot(_encoded(args[3])) if int(args[2]) > 0 else None
    if name in ("XREAD", "XREADGROUP"):
        upper = [str(a).upper() for a in args]
        return key_slot(_encoded(args[upper.index("STREAMS") + 1]))
    if name in ("XINFO", "OBJECT", "MEMORY"):       # a subcommand, then the key
        return key_slot(_encoded(args[2]))
    if name in ("PING", "MULTI", "EXEC", "INFO", "TIME", "SCRIPT", "CLIENT", "CLUSTER"):
        return None
    return key_slot(_encoded(args[1])) if len(args) > 1 else None


class ClusterUnavailable(RedisConnectionError):
    """The cluster said it is down, or a slot's master is being replaced (TRYAGAIN,
    CLUSTERDOWN): like a Redis that cannot be reached, it is waited out."""


class Router:
    """Sends commands to the masters of their slots (see the module). ``conns``, when
    given, maps master names to connections kept for one loop (`connection.Direct`);
    otherwise connections come from each master's pool and go back after the call."""

    def __init__(self, client: RedisCluster):
        self.client = client
        self.loaded = set()     # shas of scripts loaded on every master

    def node_for(self, slot: Optional[int]) -> ClusterNode:
        manager = self.client.nodes_manager
        if slot is None:
            return self.client.get_default_node()
        return manager.get_node_from_slot(slot)

    def refresh(self) -> None:
        """Learn the cluster's layout anew (after MOVED, a failover, a lost master)."""
        try:
            self.client.nodes_manager.initialize()
        except Exception:
            pass        # not reachable now: the next call fails and is retried by its loop

    def load(self, scripts) -> None:
        for script in scripts:
            if script.sha not in self.loaded:
                self.client.script_load(script.script)     # on every master
                self.loaded.add(script.sha)

    def run(self, commands: List[tuple], transaction: bool = False, parse: bool = False,
            conns: Optional[Dict[str, object]] = None) -> list:
        """The replies of ``commands`` (``(args, options)`` pairs), in order; error replies
        in place. ``parse`` applies redis-py's reply callbacks (as a pipeline's execute
        does); ``transaction`` runs them in one MULTI/EXEC (all must be in one slot)."""
        if transaction:
            slots = {slot_of(args) for args, _ in commands} - {None}
            if len(slots) > 1:
                raise ResponseError("CROSSSLOT: a MULTI block on Redis Cluster must touch "
                                    "the keys of one slot only")
            slot = slots.pop() if slots else None
            block = [(("MULTI",), {}), *commands, (("EXEC",), {})]
            replies = self._attempt([(slot, block)], parse=False, conns=conns)[0]
            if any(isinstance(reply, (MovedError, AskError)) for reply in replies):
                # the slot moved: nothing of the block ran (EXECABORT); it is sent again
                # by its loop, to where the new layout says
                self.refresh()
                raise ClusterUnavailable("a MULTI block's slot moved to another master")
            replies = replies[-1] if isinstance(replies[-1], list) else replies[1:-1]
            return self._parsed(commands, replies) if parse else replies
        replies: list = [None] * len(commands)
        todo = list(range(len(commands)))
        for _ in range(RETRIES + 1):
            groups: Dict[Optional[int], List[int]] = {}
            for i in todo:
                groups.setdefault(slot_of(commands[i][0]), []).append(i)
            units = [(slot, [commands[i] for i in indexes]) for slot, indexes in groups.items()]
            results = self._attempt(units, parse=False, conns=conns)
            todo = []
            for (_, indexes), result in zip(groups.items(), results):
                for i, reply in zip(indexes, result):
                    replies[i] = reply
                    if isinstance(reply, (MovedError, AskError)):
                        todo.append(i)
            if not todo:
                break
            self.refresh()
            todo.sort()
        else:
            raise ClusterUnavailable(f"{len(todo)} command(s) still answered MOVED/ASK after "
                                     f"{RETRIES} new looks at the cluster's layout")
        return self._parsed(commands, replies) if parse else replies

    def _attempt(self, units: List[Tuple[Optional[int], List[tuple]]], parse: bool,
                 conns: Optional[Dict[str, object]]) -> List[list]:
        """Send each unit (the commands of one slot) to its master, one write per master,
        then read every reply: the masters work side by side."""
        by_node: Dict[str, Tuple[ClusterNode, List[int]]] = {}
        for at, (slot, _) in enumerate(units):
            node = self.node_for(slot)
            by_node.setdefault(node.name, (node, []))[1].append(at)
        sent = []
        try:
            for name, (node, ats) in by_node.items():
                conn = self._connection(node, conns)
                sent.append((name, node, conn, ats))
                conn.send_packed_command(conn.pack_commands(
                    [args for at in ats for args, _ in units[at][1]]))
            results: List[Optional[list]] = [None] * len(units)
            for _, _, conn, ats in sent:
                for at in ats:
                    out = []
                    for _ in units[at][1]:
                        try:
                            out.append(conn.read_response())
                        except ResponseError as exc:
                            out.append(exc)
                    results[at] = out
        except BaseException as exc:
            for name, _, conn, _ in sent:
                conn.disconnect()       # a reply may be half read
                if conns is not None:
                    conns.pop(name, None)
            if isinstance(exc, (RedisConnectionError, OSError)):
                self.refresh()
            raise
        finally:
            if conns is None:
                for _, node, conn, _ in sent:
                    node.redis_connection.connection_pool.release(conn)
        for out in results:
            for reply in out:
                if isinstance(reply, (ClusterDownError, TryAgainError)):
                    self.refresh()
                    raise ClusterUnavailable(f"Redis Cluster: {reply}")
        return results

    @staticmethod
    def _connection(node: ClusterNode, conns: Optional[Dict[str, object]]):
        if conns is None:
            return node.redis_connection.connection_pool.get_connection()
        conn = conns.get(node.name)
        if conn is None:
            conn = conns[node.name] = node.redis_connection.connection_pool.get_connection()
        return conn

    def _parsed(self, commands: List[tuple], replies: list) -> list:
        callbacks = self.client.get_default_node().redis_connection.response_callbacks
        out = []
        for (args, options), reply in zip(commands, replies):
            name = str(args[0]).upper()
            if not isinstance(reply, Exception) and name in callbacks:
                options = {k: v for k, v in options.items() if k != "keys"}
                reply = callbacks[name](reply, **options)
            out.append(reply)
        return out


class RoutedPipeline(Pipeline):
    """A pipeline for `ClusterClient`: redis-py's own command builders and scripts, run by
    the client's `Router` (see the module)."""

    def __init__(self, client: "ClusterClient", transaction: bool):
        super().__init__(None, client.get_default_node().redis_connection.response_callbacks,
                         transaction, None)
        self.client = client

    def execute(self, raise_on_error: bool = True) -> list:
        commands, self.command_stack = self.command_stack, []
        scripts, self.scripts = self.scripts, set()
        if not commands:
            return []
        router = self.client.router
        router.load(scripts)
        replies = router.run(commands, transaction=self.transaction, parse=True)
        if any(isinstance(reply, NoScriptError) for reply in replies):
            # a master that lost its scripts (a replica promoted since): load them again and
            # send again what they refused, which did not run
            router.loaded.clear()
            router.load(scripts)
            again = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            for i, reply in zip(again, router.run([commands[i] for i in again], parse=True)):
                replies[i] = reply
        if raise_on_error:
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return replies

    def reset(self) -> None:
        self.command_stack = []
        self.scripts = set()


class ClusterClient(RedisCluster):
    """redis-py's `RedisCluster` whose pipelines are `RoutedPipeline` s."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.router = Router(self)

    def pipeline(self, transaction=None, shard_hint=None):
        return RoutedPipeline(self, bool(transaction))


def make_cluster_client(seeds: List[Tuple[str, int]], options: dict) -> ClusterClient:
    """A `ClusterClient` on the cluster that ``seeds`` (``(host, port)``) belong to."""
    options = {k: v for k, v in options.items() if k not in ("db",)}
    try:
        return ClusterClient(startup_nodes=[ClusterNode(host, port) for host, port in seeds],
                             **options)
    except Exception as exc:    # redis-py's RedisClusterException, or a connection error
        shown = ",".join(f"{host}:{port}" for host, port in seeds)
        if "cluster mode is not enabled" in str(exc).lower():
            raise RuntimeError(f"REDIS_URL: the Redis at {shown} is not a Redis Cluster node "
                               f"(cluster mode is not enabled on it): name one Redis with "
                               f"redis://host:port/db, a cluster with redis+cluster://") from None
        raise RuntimeError(f"REDIS_URL: cannot reach a Redis Cluster through {shown} ({exc}). "
                           "Check that the seeds are nodes of a running cluster whose slots "
                           "are all served (redis-cli --cluster check host:port)") from None
