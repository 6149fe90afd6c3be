"""The recovery protocol: a client that lost its connection comes back as itself.

socket.io 4.6+ connection-state recovery, across io-nodes. The io-node a client connects to
gives it a private id (``pid``, its sid and a secret); every event it is sent carries the
**offset** of the command that made it, ``<entry id>.<index>`` in the stream every io-node
reads (``<prefix>:commands``), as its last argument. A connection that ends without the
client saying goodbye (transport closed, ping timeout, its io-node shutting down) **parks**
the client instead of disconnecting it: its disconnect waits in
``<prefix>:parked-disconnects`` until its window closes (``<prefix>:parked``, by deadline),
its record, rooms and session stay. A client that reconnects in time, to any io-node, with
its pid and last offset, is **claimed**: the same sid, its rooms, its session, and every
emit it missed, read back from the stream (`Recovery.missed`). A client that does not is
disconnected when its window closes (the reaper pushes the parked disconnect), and the app
tier hears it as usual.

``<prefix>:conns`` holds each client's current connection (its Engine.IO session id): only
that connection may park it, and a disconnect of an older one is not the client leaving::

    recovery = Recovery(redis, keys, config)
    recovery.park(pipe, sid, conn, node, envelope_raw)      # its connection dropped
    found = recovery.find(pid)                              # it came back: who was it
    packets = recovery.missed(found, offset, namespace)     # what it missed, or None
    recovery.claim(found, conn, node)                       # it is ours now
"""

import heapq
import hmac
import secrets
import time
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

from .envelope import MessageError, decode_batch, dumps
from .state import Keys, parse_record

# What ends a connection without the client meaning to leave: python-socketio's reasons.
RECOVERABLE = frozenset({"transport close", "transport error", "ping timeout"})
SCAN = 500          # stream entries read per round trip while looking for missed packets
END = 1 << 30       # an index past any entry's last command: "the whole entry"

# Park a client whose connection dropped, only while that connection is still its own and
# its io-node still holds it. KEYS: conns, node-clients, parked, parked disconnects; ARGV:
# sid, its connection ('' when any), deadline in ms, its disconnect envelope.
_PARK = """
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
if redis.call('SREM', KEYS[2], ARGV[1]) == 0 then
  return 0
end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[4])
return 1
"""

# Claim a returning client for a new connection: parked, or still held by an io-node that
# has not seen its old connection drop yet. KEYS: clients, conns, parked, parked
# disconnects, the old node's clients, the new node's; ARGV: sid, its record as read,
# the new connection. Returns 0 (gone or changed meanwhile), or 1 and the old connection.
_CLAIM = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return {0, ''}
end
local parked = redis.call('ZREM', KEYS[3], ARGV[1])
local held = redis.call('SREM', KEYS[5], ARGV[1])
if parked == 0 and held == 0 then
  return {0, ''}
end
redis.call('HDEL', KEYS[4], ARGV[1])
local old = redis.call('HGET', KEYS[2], ARGV[1]) or ''
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('SADD', KEYS[6], ARGV[1])
return {1, old}
"""


class Returning(NamedTuple):
    """A client that presented a valid pid: its sid, record (as stored, and parsed)."""

    sid: str
    raw: str
    record: dict


def new_pid(sid: str) -> str:
    """A private id for ``sid``: whoever presents it may come back as that client."""
    return f"{sid}.{secrets.token_urlsafe(18)}"


def offset(entry_id: str, index: int) -> str:
    """The offset of the ``index``-th command of a stream entry, as clients carry it."""
    return f"{entry_id}.{index}"


def parse_offset(value) -> Optional[Tuple[int, int, int]]:
    """``(ms, seq, index)`` of an offset (no index: the whole entry, `END`), or None."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    entry, _, index = value.partition(".")
    ms, _, seq = entry.partition("-")
    try:
        return int(ms), int(seq), int(index) if index else END
    except ValueError:
        return None


# With several shards, an offset is a **position**: one offset per shard's stream, comma
# separated, each what the client saw of that stream. An io-node applies each stream in
# order, so a client that received a packet received every packet applied before it: the
# position of a packet is the io-node's last entry applied in every other stream. With one
# shard a position is a plain offset.

Position = List[Tuple[int, int, int]]


def parse_position(value, shards: int) -> Optional[Position]:
    """The per-shard offsets of a position, or None when it is not one of ``shards``."""
    if not isinstance(value, str) or len(value) > 64 * shards:
        return None
    parts = [parse_offset(part) for part in value.split(",")]
    return parts if len(parts) == shards and None not in parts else None


def position(offsets: Sequence[Tuple[int, int, int]]) -> str:
    return ",".join(f"{ms}-{seq}" + ("" if index >= END else f".{index}")
                    for ms, seq, index in offsets)


def later(a: str, b, shards: int) -> str:
    """The position past both ``a`` and ``b`` (``b`` ignored unless a position)."""
    first, second = parse_position(a, shards), parse_position(b, shards)
    if first is None or second is None:
        return a
    return position([max(x, y) for x, y in zip(first, second)])


class Recovery:
    """Parks, finds, claims and replays returning clients (see the module).

    :param redis: a redis-py client with ``decode_responses=True``.
    :param keys: the cluster's `Keys`.
    :param config: a `Config`: its recovery window and bounds.
    """

    def __init__(self, redis, keys: Keys, config):
        self.redis = redis
        self.keys = keys
        self.window = config.recovery_window
        self.max_packets = config.recovery_max_packets
        self.max_bytes = config.recovery_max_bytes
        self._park = redis.register_script(_PARK)
        self._claim = redis.register_script(_CLAIM)

    @property
    def enabled(self) -> bool:
        return self.window > 0

    # ---- a connection drops ---------------------------------------------------------------

    def park(self, pipe, sid: str, conn: str, node: str, envelope: str) -> None:
        """Add to ``pipe``: park ``sid`` (its connection ``conn`` dropped at io-node
        ``node``; ``conn`` '' for any) with its disconnect ``envelope`` until the window
        closes. Its reply is 1 when parked, 0 when the client was no longer there."""
        deadline = int((time.time() + self.window) * 1000)
        k = self.keys.shard(sid)
        self._park(keys=[k.conns, k.node_clients(node), k.parked, k.parked_disconnects],
                   args=[sid, conn, deadline, envelope], client=pipe)

    def due(self, shard=None, now: Optional[float] = None, count: int = 500
            ) -> List[Tuple[str, str]]:
        """Parked clients of a shard (its `ShardKeys`; the first) whose window closed, with their
        disconnect envelopes."""
        shard = shard if shard is not None else self.keys.shards[0]
        now_ms = int((time.time() if now is None else now) * 1000)
        sids = self.redis.zrangebyscore(shard.parked, "-inf", now_ms, start=0, num=count)
        if not sids:
            return []
        raws = self.redis.hmget(shard.parked_disconnects, sids)
        lost = [sid for sid, raw in zip(sids, raws) if not raw]
        if lost:
            # no envelope to push (written by hand?): nothing to wait for
            self.redis.zrem(shard.parked, *lost)
        return [(sid, raw) for sid, raw in zip(sids, raws) if raw]

    def end_now(self, sid: str) -> None:
        """Close a parked client's window now (the app disconnected it): the reaper's next
        pass pushes its disconnect."""
        self.redis.zadd(self.keys.shard(sid).parked, {sid: 0}, xx=True)

    # ---- a client comes back ----------------------------------------------------------------

    def find(self, pid) -> Optional[Returning]:
        """The client a presented pid belongs to, or None (unknown, forged, or forgotten)."""
        if not isinstance(pid, str) or "." not in pid or len(pid) > 200:
            return None
        sid = pid.partition(".")[0]
        raw = self.redis.hget(self.keys.shard(sid).clients, sid)
        record = parse_record(raw)
        if record is None or not isinstance(record.get("pid"), str) \
                or not hmac.compare_digest(record["pid"], pid):
            return None
        return Returning(sid, raw, record)

    def claim(self, found: Returning, conn: str, node: str) -> Optional[str]:
        """Make ``found`` the client of connection ``conn`` at io-node ``node``; returns the
        connection it had ('' when parked or unknown), None when it was gone meanwhile."""
        k = self.keys.shard(found.sid)
        ok, old = self._claim(keys=[k.clients, k.conns, k.parked, k.parked_disconnects,
                                    k.node_clients(found.record.get("node") or ""),
                                    k.node_clients(node)],
                              args=[found.sid, found.raw, conn])
        return old if int(ok) else None

    def missed(self, found: Returning, client_offset, namespace: str, rooms=None,
               until: Optional[str] = None, bounded: bool = True
               ) -> Optional[List[Tuple[dict, str]]]:
        """The emits ``found`` missed since its position (or since it connected, whichever
        is later), each with its position, in order; None when it cannot be told exactly
        (a stream was trimmed past it, the position is not ours) or it missed more than
        the bounds allow (``bounded``), or the app disconnected it meanwhile. ``rooms`` are
        its rooms, its sid included (read when not given); ``until`` (a position) stops
        early."""
        shards = self.keys.shards
        start = parse_position(found.record.get("since") or ",".join(["0-0"] * len(shards)),
                               len(shards))
        given = parse_position(client_offset, len(shards)) \
            if client_offset is not None else None
        if start is None or (client_offset is not None and given is None):
            return None
        if given is not None:
            start = [max(a, b) for a, b in zip(start, given)]
        stops = parse_position(until, len(shards)) if until else [None] * len(shards)
        if stops is None or not all(self._unbroken(shard.commands, at)
                                    for shard, at in zip(shards, start)):
            return None
        if rooms is None:
            rooms = set(self.redis.smembers(self.keys.shard(found.sid).client_rooms(found.sid)))
            rooms.add(found.sid)
        out: List[Tuple[dict, str]] = []
        size = 0
        # the shards' streams merged by time; every command passed, sent or not for this
        # client, moves its stream's part of the position
        at = list(start)
        for key, command in heapq.merge(*(self.commands_after(shard, start[shard.index],
                                                              stops[shard.index])
                                          for shard in shards)):
            at[key[2]] = (key[0], key[1], key[3])
            if command.get("m") == "disconnect" and command.get("sid") == found.sid:
                return None
            if not reaches(command, found.sid, namespace, rooms):
                continue
            out.append((command, position(at)))
            size += len(dumps(command))
            if bounded and (len(out) > self.max_packets or size > self.max_bytes):
                return None
        return out

    def _unbroken(self, stream: str, start: Tuple[int, int, int]) -> bool:
        """Whether every entry after ``start`` is still in the stream."""
        if start[:2] == (0, 0):
            try:
                info = self.redis.xinfo_stream(stream)
            except Exception:
                return True          # no such stream: nothing was ever written, or trimmed
            added = info.get("entries-added")
            return added is not None and int(added) == int(info["length"])
        entry = f"{start[0]}-{start[1]}"
        return bool(self.redis.xrange(stream, entry, entry, count=1))

    def commands_after(self, shard, start: Tuple[int, int, int],
                       stop: Optional[Tuple[int, int, int]] = None
                       ) -> Iterator[Tuple[tuple, dict]]:
        """``((ms, seq, shard, index), command)`` of a shard's stream after ``start``, in
        order, up to ``stop`` when given."""
        low = f"{start[0]}-{start[1]}"          # inclusive: the rest of a half-seen entry
        while True:
            items = self.redis.xrange(shard.commands, low, "+", count=SCAN)
            for entry_id, fields in items:
                ms, _, seq = entry_id.partition("-")
                try:
                    batch = decode_batch(fields.get("b"))
                except MessageError:
                    continue
                for index, command in enumerate(batch):
                    at = (int(ms), int(seq), index)
                    if at <= start:
                        continue
                    if stop is not None and at > stop:
                        return
                    yield (at[0], at[1], shard.index, index), command
            if len(items) < SCAN:
                return
            low = "(" + items[-1][0]


def reaches(command: dict, sid: str, namespace: str, rooms: set) -> bool:
    """Whether an emit command reaches client ``sid`` of ``namespace`` in ``rooms``; emits
    that wait for an answer (calls) are not replayed, as socket.io does."""
    if command.get("m") != "emit" or command.get("ns", "/") != namespace:
        return False
    skip = command.get("skip")
    if skip is not None and (skip == sid or (isinstance(skip, list) and sid in skip)):
        return False
    to = command.get("to")
    if to is None:
        return True
    if isinstance(to, str):
        return to in rooms
    return isinstance(to, list) and any(room in rooms for room in to)
