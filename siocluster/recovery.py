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

import hmac
import secrets
import time
from typing import Iterator, List, NamedTuple, Optional, Tuple

from .envelope import MessageError, decode_batch, dumps
from .state import Keys, parse_record

# What ends a connection without the client meaning to leave: python-socketio's reasons.
RECOVERABLE = frozenset({"transport close", "transport error", "ping timeout"})
SCAN = 500          # stream entries read per round trip while looking for missed packets

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
    """``(ms, seq, index)`` of an offset (index -1: the whole entry was seen), or None."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    entry, _, index = value.partition(".")
    ms, _, seq = entry.partition("-")
    try:
        return int(ms), int(seq), int(index) if index else -1
    except ValueError:
        return None


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
        self._park(keys=[self.keys.conns, self.keys.node_clients(node), self.keys.parked,
                         self.keys.parked_disconnects],
                   args=[sid, conn, deadline, envelope], client=pipe)

    def due(self, now: Optional[float] = None, count: int = 500) -> List[Tuple[str, str]]:
        """Parked clients whose window closed, with their disconnect envelopes."""
        now_ms = int((time.time() if now is None else now) * 1000)
        sids = self.redis.zrangebyscore(self.keys.parked, "-inf", now_ms, start=0, num=count)
        if not sids:
            return []
        raws = self.redis.hmget(self.keys.parked_disconnects, sids)
        lost = [sid for sid, raw in zip(sids, raws) if not raw]
        if lost:
            # no envelope to push (written by hand?): nothing to wait for
            self.redis.zrem(self.keys.parked, *lost)
        return [(sid, raw) for sid, raw in zip(sids, raws) if raw]

    def end_now(self, sid: str) -> None:
        """Close a parked client's window now (the app disconnected it): the reaper's next
        pass pushes its disconnect."""
        self.redis.zadd(self.keys.parked, {sid: 0}, xx=True)

    # ---- a client comes back ----------------------------------------------------------------

    def find(self, pid) -> Optional[Returning]:
        """The client a presented pid belongs to, or None (unknown, forged, or forgotten)."""
        if not isinstance(pid, str) or "." not in pid or len(pid) > 200:
            return None
        sid = pid.partition(".")[0]
        raw = self.redis.hget(self.keys.clients, sid)
        record = parse_record(raw)
        if record is None or not isinstance(record.get("pid"), str) \
                or not hmac.compare_digest(record["pid"], pid):
            return None
        return Returning(sid, raw, record)

    def claim(self, found: Returning, conn: str, node: str) -> Optional[str]:
        """Make ``found`` the client of connection ``conn`` at io-node ``node``; returns the
        connection it had ('' when parked or unknown), None when it was gone meanwhile."""
        k = self.keys
        ok, old = self._claim(keys=[k.clients, k.conns, k.parked, k.parked_disconnects,
                                    k.node_clients(found.record.get("node") or ""),
                                    k.node_clients(node)],
                              args=[found.sid, found.raw, conn])
        return old if int(ok) else None

    def missed(self, found: Returning, client_offset, namespace: str, rooms=None,
               until: Optional[str] = None, bounded: bool = True
               ) -> Optional[List[Tuple[dict, str]]]:
        """The emits ``found`` missed since its offset (or since it connected, whichever is
        later), each with its offset, in order; None when it cannot be told exactly (the
        stream was trimmed past it, the offset is not ours) or it missed more than the
        bounds allow (``bounded``), or the app disconnected it meanwhile. ``rooms`` are its
        rooms, its sid included (read when not given); ``until`` (an offset) stops early."""
        start = parse_offset(found.record.get("since") or "0-0")
        given = parse_offset(client_offset) if client_offset is not None else None
        if start is None or (client_offset is not None and given is None):
            return None
        if given is not None and given > start:
            start = given
        if not self._unbroken(start):
            return None
        if rooms is None:
            rooms = set(self.redis.smembers(self.keys.client_rooms(found.sid)))
            rooms.add(found.sid)
        out: List[Tuple[dict, str]] = []
        size = 0
        for entry_id, index, command in self.commands_after(start, until):
            if command.get("m") == "disconnect" and command.get("sid") == found.sid:
                return None
            if not reaches(command, found.sid, namespace, rooms):
                continue
            out.append((command, offset(entry_id, index)))
            size += len(dumps(command))
            if bounded and (len(out) > self.max_packets or size > self.max_bytes):
                return None
        return out

    def _unbroken(self, start: Tuple[int, int, int]) -> bool:
        """Whether every entry after ``start`` is still in the stream."""
        stream = self.keys.commands
        if start[:2] == (0, 0):
            try:
                info = self.redis.xinfo_stream(stream)
            except Exception:
                return True          # no such stream: nothing was ever written, or trimmed
            added = info.get("entries-added")
            return added is not None and int(added) == int(info["length"])
        entry = f"{start[0]}-{start[1]}"
        return bool(self.redis.xrange(stream, entry, entry, count=1))

    def commands_after(self, start: Tuple[int, int, int],
                       until: Optional[str] = None) -> Iterator[Tuple[str, int, dict]]:
        """``(entry id, index, command)`` of the shared stream after ``start``, in order,
        up to ``until`` (an offset) when given."""
        stop = parse_offset(until) if until else None
        low = f"{start[0]}-{start[1]}"          # inclusive: the rest of a half-seen entry
        while True:
            items = self.redis.xrange(self.keys.commands, low, "+", count=SCAN)
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
                    yield entry_id, index, command
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
