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
from typing import Dict, Iterable, List, Optional

from .envelope import dumps, parse


class Keys:
    """Every Redis key of one cluster, under its prefix."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.ready = f"{prefix}:ready"                # list: clients waiting for an app-node
        self.queue_prefix = f"{prefix}:queue:"        # list per client: its messages, in order
        self.inbox_size = f"{prefix}:inbox-size"      # hash: messages and bytes in the queues
        self.session_prefix = f"{prefix}:session:"
        self.dead = f"{prefix}:dead"                  # list: envelopes that failed too often
        self.commands = f"{prefix}:commands"          # stream: commands for every io-node
        self.command_seq = f"{prefix}:command-seq"    # counter: numbers every stream entry
        self.clients = f"{prefix}:clients"            # hash: sid -> client record
        self.nodes = f"{prefix}:nodes"                # hash: node id -> node info
        self.room_prefix = f"{prefix}:room:"
        self.client_rooms_prefix = f"{prefix}:rooms:"
        self.reaper_lock = f"{prefix}:reaper"         # string: one reaper pass at a time
        self.conns = f"{prefix}:conns"                # hash: sid -> its connection right now
        self.parked = f"{prefix}:parked"              # zset: sid -> when its window closes
        self.parked_disconnects = f"{prefix}:parked-disconnects"   # hash: sid -> envelope

    def queue(self, sid: str) -> str:
        """List of one client's messages, the oldest at the right end."""
        return self.queue_prefix + sid

    def processing(self, app_node: str) -> str:
        """List of the clients (sids) whose messages one app-node is handling right now."""
        return f"{self.prefix}:processing:{app_node}"

    def node_commands(self, node: str) -> str:
        """Stream of commands meant for the clients of one io-node only."""
        return f"{self.prefix}:commands:{node}"

    def alive(self, node: str) -> str:
        """Expiring key: exists while the node's heartbeat is fresh."""
        return f"{self.prefix}:alive:{node}"

    def node_clients(self, node: str) -> str:
        return f"{self.prefix}:node-clients:{node}"

    def namespace_clients(self, namespace: str) -> str:
        return f"{self.prefix}:ns-clients:{namespace}"

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

    def reply(self, call_id: str) -> str:
        """List an app.call() waits on for the client's answer."""
        return f"{self.prefix}:reply:{call_id}"

    def tombstone(self, node: str) -> str:
        """Exists while a node the reaper cleaned up has not heartbeated since."""
        return f"{self.prefix}:reaped:{node}"

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

# The registry entry goes last, once nothing of the node is left to hand over. KEYS: alive,
# nodes, processing, node-clients, node command stream; ARGV: node id.
_BURY = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
if redis.call('LLEN', KEYS[3]) > 0 or redis.call('SCARD', KEYS[4]) > 0 then
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[5])
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
        r.hset(self.keys.clients, sid, json.dumps(record))
        if record.get("conn"):
            r.hset(self.keys.conns, sid, record["conn"])
        r.sadd(self.keys.node_clients(node), sid)
        r.sadd(self.keys.namespace_clients(namespace), sid)
        if pipe is None:
            r.execute()

    def forget_client(self, sid: str, namespace: str, node: str, pipe=None) -> None:
        """Remove a client with its rooms and session."""
        k = self.keys
        self._forget(keys=[k.clients, k.client_rooms(sid), k.session(sid), k.node_clients(node),
                           k.namespace_clients(namespace), k.conns, k.parked,
                           k.parked_disconnects],
                     args=[sid, k.rooms_of(namespace)], client=pipe)

    def client(self, sid: str) -> Optional[dict]:
        """The record of a connected client: sid, namespace, node, info, connected_at."""
        raw = self.redis.hget(self.keys.clients, sid)
        return json.loads(raw) if raw else None

    def client_node(self, sid: str) -> Optional[str]:
        record = self.client(sid)
        return record["node"] if record else None

    def clients(self, namespace: Optional[str] = None) -> List[dict]:
        """Every connected client, or those of one namespace."""
        if namespace is None:
            return [json.loads(v) for v in self.redis.hvals(self.keys.clients)]
        sids = list(self.redis.smembers(self.keys.namespace_clients(namespace)))
        return [r for r in self._records(sids) if r is not None]

    def count(self, namespace: Optional[str] = None) -> int:
        if namespace is None:
            return self.redis.hlen(self.keys.clients)
        return self.redis.scard(self.keys.namespace_clients(namespace))

    def _records(self, sids: List[str]) -> List[Optional[dict]]:
        if not sids:
            return []
        return [json.loads(v) if v else None for v in self.redis.hmget(self.keys.clients, sids)]

    # ---- rooms (written by app-nodes) -----------------------------------------------------

    def enter_room(self, sid: str, namespace: str, room: str, pipe=None) -> None:
        r = pipe if pipe is not None else self.redis.pipeline(transaction=False)
        r.sadd(self.keys.room(namespace, room), sid)
        r.sadd(self.keys.client_rooms(sid), room)
        if pipe is None:
            r.execute()

    def leave_room(self, sid: str, namespace: str, room: str, pipe=None) -> None:
        r = pipe if pipe is not None else self.redis.pipeline(transaction=False)
        r.srem(self.keys.room(namespace, room), sid)
        r.srem(self.keys.client_rooms(sid), room)
        if pipe is None:
            r.execute()

    def close_room(self, namespace: str, room: str) -> int:
        return self._close_room(keys=[self.keys.room(namespace, room)],
                                args=[room, self.keys.client_rooms_prefix])

    def rooms(self, sid: str) -> List[str]:
        """The rooms a client is in (its own sid room not included)."""
        return sorted(self.redis.smembers(self.keys.client_rooms(sid)))

    def room_members(self, namespace: str, room: str) -> List[str]:
        """The sids in a room, across every io-node."""
        return sorted(self.redis.smembers(self.keys.room(namespace, room)))

    def room_clients(self, namespace: str, room: str) -> List[dict]:
        """The client records of a room's members (for "who is online")."""
        records = self._records(self.room_members(namespace, room))
        return [r for r in records if r is not None]

    # ---- sessions ---------------------------------------------------------------------------

    def get_session(self, sid: str) -> dict:
        raw = self.redis.get(self.keys.session(sid))
        return parse(raw) if raw else {}

    def save_session(self, sid: str, session: dict) -> None:
        self.redis.set(self.keys.session(sid), dumps(session))

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
        return bool(self._bury(keys=[k.alive(node), k.nodes, k.processing(node),
                                     k.node_clients(node), k.node_commands(node)], args=[node]))


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
