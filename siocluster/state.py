"""Cluster state in Redis: the key layout, clients, rooms, sessions and the node registry.

Any app-node can answer any message because what a handler needs to know about the
cluster lives here: which io-node holds a client and its info (the seed's
``getClientInfo``), which clients are in a room across all io-nodes, each client's session,
and which nodes are alive. io-nodes write client records; app-nodes write rooms and
sessions as their handlers call `enter_room` or `save_session`, so a handler reads its own
writes at once.
"""

import json
import time
import zlib
from typing import Dict, Iterable, List, Optional

from .envelope import dumps, parse


class ShardKeys:
    """The keys of one shard: everything about the clients of the shard (queue, session,
    record, rooms), its ready list, the processing lists of its clients, its command stream.
    On a Redis Cluster they share one hash tag, so a shard's scripts touch one slot; on one
    Redis with one shard they are the cluster's keys of old, ``<prefix>:ready`` and so on."""

    def __init__(self, base: str, index: int = 0):
        self.index = index
        self.base = base
        self.ready = f"{base}:ready"                  # list: clients waiting for an app-node
        self.queue_prefix = f"{base}:queue:"          # list per client: its messages, in order
        self.inbox_size = f"{base}:inbox-size"        # hash: messages and bytes in the queues
        self.session_prefix = f"{base}:session:"
        self.dead = f"{base}:dead"                    # list: envelopes that failed too often
        self.commands = f"{base}:commands"            # stream: commands for every io-node
        self.command_seq = f"{base}:command-seq"      # counter: numbers every stream entry
        self.clients = f"{base}:clients"              # hash: sid -> client record
        self.room_prefix = f"{base}:room:"
        self.client_rooms_prefix = f"{base}:rooms:"
        self.conns = f"{base}:conns"                  # hash: sid -> its connection right now
        self.parked = f"{base}:parked"                # zset: sid -> when its window closes
        self.parked_disconnects = f"{base}:parked-disconnects"   # hash: sid -> envelope

    def queue(self, sid: str) -> str:
        """List of one client's messages, the oldest at the right end."""
        return self.queue_prefix + sid

    def processing(self, app_node: str) -> str:
        """List of the clients (sids) whose messages one app-node is handling right now."""
        return f"{self.base}:processing:{app_node}"

    def node_clients(self, node: str) -> str:
        return f"{self.base}:node-clients:{node}"

    def namespace_clients(self, namespace: str) -> str:
        return f"{self.base}:ns-clients:{namespace}"

    def rooms_of(self, namespace: str) -> str:
        """The prefix of a namespace's room keys. The namespace's length comes first, so
        no two (namespace, room) pairs share a key (``/a`` + ``b:c`` and ``/a:b`` + ``c``)."""
        return f"{self.room_prefix}{len(namespace)}:{namespace}:"

    def room(self, namespace: str, room: str) -> str:
        return self.rooms_of(namespace) + room

    def client_rooms(self, sid: str) -> str:
        return f"{self.client_rooms_prefix}{sid}"

    def session(self, sid: str) -> str:
        return self.session_prefix + sid


class Keys:
    """Every Redis key of one cluster, under its prefix: the keys of each of ``shards``
    shards (`ShardKeys`, `shard`), and the few of the whole cluster (nodes, heartbeats).
    On a Redis Cluster (``cluster``) the shards' keys carry hash tags spread over the slot
    space (`slots.shard_tags`), the cluster-wide ones the tag ``{<prefix>}``.

    With one shard, the shard's keys are also the attributes of `Keys` itself
    (``keys.ready``, ``keys.queue(sid)``); with more, the code picks a shard first."""

    def __init__(self, prefix: str, shards: int = 1, cluster: bool = False):
        self.prefix = prefix
        self.cluster = cluster
        if shards == 1 and not cluster:
            self.shards = [ShardKeys(prefix)]
        else:
            from .slots import shard_tags
            self.shards = [ShardKeys(f"{prefix}:{{{tag}}}", k)
                           for k, tag in enumerate(shard_tags(prefix, shards))]
        base = f"{{{prefix}}}" if cluster else prefix
        self.base = base
        self.nodes = f"{base}:nodes"                  # hash: node id -> node info
        self.reaper_lock = f"{base}:reaper"           # string: one reaper pass at a time
        self.layout = f"{base}:layout"                # string: the shard count, fixed once set

    def shard(self, sid: str) -> ShardKeys:
        """The shard of a client's keys: for good, by its sid."""
        shards = self.shards
        if len(shards) == 1:
            return shards[0]
        return shards[zlib.crc32(sid.encode("utf-8", "surrogateescape")) % len(shards)]

    def __getattr__(self, name: str):
        # the only shard's keys, as attributes of the cluster's (see the class)
        shards = self.__dict__.get("shards")
        if shards and len(shards) == 1 and not name.startswith("_"):
            return getattr(shards[0], name)
        raise AttributeError(f"Keys has no {name!r}" + (
            " of its own: with several shards, pick one (keys.shard(sid), keys.shards)"
            if shards and hasattr(shards[0], name) else ""))

    def node_commands(self, node: str) -> str:
        """Stream of commands meant for the clients of one io-node only."""
        return f"{self.prefix}:commands:{node}"

    def alive(self, node: str) -> str:
        """Expiring key: exists while the node's heartbeat is fresh."""
        return f"{self.base}:alive:{node}"

    def reply(self, call_id: str) -> str:
        """List an app.call() waits on for the client's answer."""
        return f"{self.prefix}:reply:{call_id}"

    def tombstone(self, node: str) -> str:
        """Exists while a node the reaper cleaned up has not heartbeated since."""
        return f"{self.base}:reaped:{node}"

    def app(self, *parts: str) -> str:
        """A key for the application's own data (`App.key`)."""
        return ":".join((self.prefix, "app", *parts))


# Removing a client touches keys derived from its record, so it runs as one script: no other
# reader sees it half gone. KEYS: clients, client_rooms, session, node_clients, ns_clients,
# conns, parked, parked disconnects; ARGV: sid, room key prefix including the namespace.
_FORGET_CLIENT = """
local rooms = redis.call('SMEMBERS', KEYS[2])
for _, room in ipairs(rooms) do
  redis.call('SREM', ARGV[2] .. room, ARGV[1])
end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[4], ARGV[1])
redis.call('SREM', KEYS[5], ARGV[1])
redis.call('HDEL', KEYS[6], ARGV[1])
redis.call('ZREM', KEYS[7], ARGV[1])
redis.call('HDEL', KEYS[8], ARGV[1])
return #rooms
"""

# KEYS: the room; ARGV: room name, client_rooms key prefix
_CLOSE_ROOM = """
local sids = redis.call('SMEMBERS', KEYS[1])
for _, sid in ipairs(sids) do
  redis.call('SREM', ARGV[2] .. sid, ARGV[1])
end
redis.call('DEL', KEYS[1])
return #sids
"""

# A heartbeat that finds the tombstone the reaper left tells its node it was given up for
# dead. KEYS: nodes, alive, tombstone; ARGV: node id, info, now, ttl in ms.
_HEARTBEAT = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
return redis.call('DEL', KEYS[3])
"""

# A node found dead gets a tombstone, unless it heartbeated meanwhile. KEYS: alive,
# tombstone; ARGV: tombstone ttl in seconds.
_CONDEMN = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('SET', KEYS[2], '1', 'EX', ARGV[1])
return 1
"""

# The registry entry goes last, once nothing of the node is left to hand over (its shards'
# processing lists and client sets were found empty just before). KEYS: alive, nodes;
# ARGV: node id.
_BURY = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""

TOMBSTONE_TTL = 24 * 3600     # seconds a dead node's tombstone waits for the node to return


class ClusterState:
    """Reads and writes the cluster state; both io-nodes and app-nodes hold one.

    :param redis: a redis-py client with ``decode_responses=True``.
    :param keys: the cluster's `Keys`.
    """

    def __init__(self, redis, keys: Keys):
        self.redis = redis
        self.keys = keys
        self._forget = redis.register_script(_FORGET_CLIENT)
        self._close_room = redis.register_script(_CLOSE_ROOM)
        self._heartbeat = redis.register_script(_HEARTBEAT)
        self._condemn = redis.register_script(_CONDEMN)
        self._bury = redis.register_script(_BURY)

    # ---- clients (written by io-nodes) ----------------------------------------------------

    def add_client(self, record: dict, pipe=None) -> None:
        """Register a connected client: ``record`` has sid, namespace, node and info, and
        ``conn``, its connection (Engine.IO session id), when the client may recover."""
        r = pipe if pipe is not None else self.redis.pipeline(transaction=False)
        sid, node, namespace = record["sid"], record["node"], record["namespace"]
        k = self.keys.shard(sid)
        r.hset(k.clients, sid, json.dumps(record))
        if record.get("conn"):
            r.hset(k.conns, sid, record["conn"])
        r.sadd(k.node_clients(node), sid)
        r.sadd(k.namespace_clients(namespace), sid)
        if pipe is None:
            r.execute()

    def forget_client(self, sid: str, namespace: str, node: str, pipe=None) -> None:
        """Remove a client with its rooms and session."""
        k = self.keys.shard(sid)
        self._forget(keys=[k.clients, k.client_rooms(sid), k.session(sid), k.node_clients(node),
                           k.namespace_clients(namespace), k.conns, k.parked,
                           k.parked_disconnects],
                     args=[sid, k.rooms_of(namespace)], client=pipe)

    def client(self, sid: str) -> Optional[dict]:
        """The record of a connected client: sid, namespace, node, info, connected_at."""
        raw = self.redis.hget(self.keys.shard(sid).clients, sid)
        return json.loads(raw) if raw else None

    def client_node(self, sid: str) -> Optional[str]:
        record = self.client(sid)
        return record["node"] if record else None

    def clients(self, namespace: Optional[str] = None) -> List[dict]:
        """Every connected client, or those of one namespace."""
        if namespace is None:
            return [json.loads(v) for values in self._each_shard("hvals", "clients")
                    for v in values]
        sids = [sid for members in self._each_shard("smembers", "namespace_clients", namespace)
                for sid in members]
        return [r for r in self._records(sids) if r is not None]

    def count(self, namespace: Optional[str] = None) -> int:
        if namespace is None:
            return sum(self._each_shard("hlen", "clients"))
        return sum(self._each_shard("scard", "namespace_clients", namespace))

    def _each_shard(self, command: str, key: str, *key_args) -> list:
        """The replies of ``command`` on one key of each shard (``key``: its `ShardKeys`
        attribute, called with ``key_args`` when given), in one pipeline."""
        pipe = self.redis.pipeline(transaction=False)
        for shard in self.keys.shards:
            name = getattr(shard, key)
            getattr(pipe, command)(name(*key_args) if key_args else name)
        return pipe.execute()

    def _records(self, sids: List[str]) -> List[Optional[dict]]:
        if not sids:
            return []
        by_shard: Dict[int, List[str]] = {}
        for sid in sids:
            by_shard.setdefault(self.keys.shard(sid).index, []).append(sid)
        pipe = self.redis.pipeline(transaction=False)
        for index, group in by_shard.items():
            pipe.hmget(self.keys.shards[index].clients, group)
        found = {sid: raw for group, raws in zip(by_shard.values(), pipe.execute())
                 for sid, raw in zip(group, raws)}
        return [json.loads(found[sid]) if found[sid] else None for sid in sids]

    # ---- rooms (written by app-nodes) -----------------------------------------------------

    def enter_room(self, sid: str, namespace: str, room: str, pipe=None) -> None:
        r = pipe if pipe is not None else self.redis.pipeline(transaction=False)
        k = self.keys.shard(sid)
        r.sadd(k.room(namespace, room), sid)
        r.sadd(k.client_rooms(sid), room)
        if pipe is None:
            r.execute()

    def leave_room(self, sid: str, namespace: str, room: str, pipe=None) -> None:
        r = pipe if pipe is not None else self.redis.pipeline(transaction=False)
        k = self.keys.shard(sid)
        r.srem(k.room(namespace, room), sid)
        r.srem(k.client_rooms(sid), room)
        if pipe is None:
            r.execute()

    def close_room(self, namespace: str, room: str) -> int:
        pipe = self.redis.pipeline(transaction=False)
        for k in self.keys.shards:
            self._close_room(keys=[k.room(namespace, room)], args=[room, k.client_rooms_prefix],
                             client=pipe)
        return sum(pipe.execute())

    def rooms(self, sid: str) -> List[str]:
        """The rooms a client is in (its own sid room not included)."""
        return sorted(self.redis.smembers(self.keys.shard(sid).client_rooms(sid)))

    def room_members(self, namespace: str, room: str) -> List[str]:
        """The sids in a room, across every io-node (and every shard)."""
        return sorted(sid for members in self._each_shard("smembers", "room", namespace, room)
                      for sid in members)

    def room_clients(self, namespace: str, room: str) -> List[dict]:
        """The client records of a room's members (for "who is online")."""
        records = self._records(self.room_members(namespace, room))
        return [r for r in records if r is not None]

    # ---- sessions ---------------------------------------------------------------------------

    def get_session(self, sid: str) -> dict:
        raw = self.redis.get(self.keys.shard(sid).session(sid))
        return parse(raw) if raw else {}

    def save_session(self, sid: str, session: dict) -> None:
        self.redis.set(self.keys.shard(sid).session(sid), dumps(session))

    # ---- nodes ------------------------------------------------------------------------------

    def heartbeat(self, node: str, info: dict, ttl: float) -> bool:
        """Mark a node alive for ``ttl`` seconds, with what others should know of it;
        True when the reaper had given it up for dead since its last heartbeat."""
        k = self.keys
        return bool(self._heartbeat(keys=[k.nodes, k.alive(node), k.tombstone(node)],
                                    args=[node, json.dumps(info), str(time.time()),
                                          int(ttl * 1000)]))

    def remove_node(self, node: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hdel(self.keys.nodes, node)
        pipe.delete(self.keys.alive(node))
        pipe.execute()

    def nodes(self, role: Optional[str] = None, alive: Optional[bool] = True) -> Dict[str, dict]:
        """Registered nodes by id; ``alive=True`` the live ones, ``False`` the dead, ``None``
        all of them."""
        infos = {node: json.loads(raw) for node, raw in self.redis.hgetall(self.keys.nodes).items()}
        if role is not None:
            infos = {n: i for n, i in infos.items() if i.get("role") == role}
        if alive is None or not infos:
            return infos
        ids = list(infos)
        pipe = self.redis.pipeline(transaction=False)
        for node in ids:
            pipe.exists(self.keys.alive(node))
        flags = pipe.execute()
        return {n: infos[n] for n, up in zip(ids, flags) if bool(up) == alive}


    def condemn(self, node: str) -> bool:
        """Mark a node found dead with a tombstone, unless it heartbeated meanwhile; True
        when it is condemned and its leftovers are now for the caller to clean up."""
        return bool(self._condemn(keys=[self.keys.alive(node), self.keys.tombstone(node)],
                                  args=[TOMBSTONE_TTL]))

    def bury(self, node: str) -> bool:
        """Remove a dead node's registry entry and command stream, once nothing of it is
        left to hand over (its processing list and client set are empty)."""
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        for shard in k.shards:
            pipe.llen(shard.processing(node))
            pipe.scard(shard.node_clients(node))
        if any(pipe.execute()):
            return False
        if not self._bury(keys=[k.alive(node), k.nodes], args=[node]):
            return False
        self.redis.delete(k.node_commands(node))
        return True


def parse_record(raw: Optional[str]) -> Optional[dict]:
    """A client record as stored, parsed; None when there is none or it is not a JSON
    object (written by something else)."""
    if not raw:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def chunks(items: Iterable, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
