"""The inbox protocol, end to end: every move of a client message between Redis keys.

Each client has a queue of its own, ``<prefix>:queue:<sid>``: io-nodes `push` its connect,
events and disconnect there in the order they arrived (LPUSH, so the oldest is at the
right end). A client whose queue holds messages has one **token**, its sid, in exactly one
place: the ready list ``<prefix>:ready``, where it waits for an app-node, or the processing
list of the app-node handling it (``<prefix>:processing:<id>``). So one app-node at a time
handles a client's messages, oldest first, while other clients' go on side by side.

An app-node `take`\\ s tokens, each with the client's oldest messages and its session, and
`finish`\\ es them in the round trip that writes their handlers' commands and sessions: the
handled messages leave the queue, the token goes to the back of the ready list if more
wait. A message leaves its queue only when finished, so a crash leaves it there and its
token in a processing list, where the reaper finds it: delivery is at least once.

Where a token goes, in one place: after a **retry** (a handler raised), to the back of
the line, the message first in its queue with ``attempt + 1``; a **give-back** (taken, not
started), to the front, the messages untouched; a **hand-back** (its app-node died or
stopped with it half done), to the front, the oldest message with ``attempt + 1``, or to
the dead-letter list once tried ``max_attempts`` times.

The scripts count the messages and bytes in the queues in ``<prefix>:inbox-size``, so
`push` refuses past the bounds without walking a list. The class returns values and adds
to pipelines it is given; it never calls back into a node::

    inbox = Inbox(redis, keys, config)
    groups, more = inbox.take(processing, clients=16, timeout=1.0)
    inbox.give_back(processing, [group.sid for group in groups])
"""

import logging
import time
from typing import List, NamedTuple, Optional, Sequence, Tuple

from redis.exceptions import NoScriptError

from .connection import Direct
from .envelope import Envelope, dumps

logger = logging.getLogger("siocluster.inbox")

# Push envelopes in order to their clients' queues, a token to the ready list for a queue
# that was empty, refusing connects and events past the bounds (messages, bytes, messages
# of one client: by LPUSH's reply, then taken back); never a disconnect, which the app
# tier must hear of. KEYS: ready, size; ARGV: queue prefix, maxlen, max bytes, per-client
# maxlen, then kind, sid, envelope for each. Returns the positions (0-based) refused.
_PUSH = """
local count = tonumber(redis.call('HGET', KEYS[2], 'messages') or '0')
local bytes = tonumber(redis.call('HGET', KEYS[2], 'bytes') or '0')
local maxlen, max_bytes, per_client = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local refused, added, added_bytes = {}, 0, 0
for i = 5, #ARGV, 3 do
  local queue, raw, anyway = ARGV[1] .. ARGV[i + 1], ARGV[i + 2], ARGV[i] == 'disconnect'
  local length = (anyway or (count + added < maxlen and bytes + added_bytes + #raw <= max_bytes))
      and redis.call('LPUSH', queue, raw) or 0
  if length > per_client and not anyway then
    redis.call('LPOP', queue)
    length = 0
  end
  if length == 0 then
    refused[#refused + 1] = (i - 5) / 3
  else
    if length == 1 then redis.call('LPUSH', KEYS[1], ARGV[i + 1]) end
    added, added_bytes = added + 1, added_bytes + #raw
  end
end
if added > 0 then
  redis.call('HINCRBY', KEYS[2], 'messages', added)
  redis.call('HINCRBY', KEYS[2], 'bytes', added_bytes)
end
return refused
"""

# Move up to ARGV[3] tokens from the ready list to a processing list, each with its
# client's session and oldest messages (at most ARGV[4]); with ARGV[5] = 1, first the token
# a BLMOVE pipelined just before put at the processing list's head. KEYS: ready, processing;
# ARGV: queue prefix, session prefix, ... Returns how many tokens still wait, then sid,
# session, messages (newest first) for each.
_TAKE = """
local out = {0}
local function group(sid)
  out[#out + 1] = sid
  out[#out + 1] = redis.call('GET', ARGV[2] .. sid)
  out[#out + 1] = redis.call('LRANGE', ARGV[1] .. sid, -tonumber(ARGV[4]), -1)
end
if ARGV[5] == '1' then
  local sid = redis.call('LINDEX', KEYS[2], 0)
  if sid then
    group(sid)
  else
    out[#out + 1], out[#out + 2], out[#out + 3] = '', false, {}
  end
end
for i = 1, tonumber(ARGV[3]) do
  local sid = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not sid then
    break
  end
  group(sid)
end
out[1] = redis.call('LLEN', KEYS[1])
return out
"""

# Finish what an app-node did with the clients it holds, each only while it still holds
# the token (else the reaper handed it over, and whoever holds it now handles them again):
# handled messages leave the queue, retried ones are replaced in place, and a released
# token goes to the back of the line when messages wait. KEYS: ready, processing, size;
# ARGV: queue prefix, then for each client: sid, release (1/0), n, m, the n messages to
# remove, then m pairs of a retried message and its replacement. Returns how many tokens
# wait.
_FINISH = """
local removed, removed_bytes, i = 0, 0, 2
while i <= #ARGV do
  local sid, release, n, m = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local queue = ARGV[1] .. sid
  i = i + 4
  -- still held? a token released says so by its LREM's reply (no LPOS first)
  if release == '1' and redis.call('LREM', KEYS[2], 1, sid) == 1
      or release ~= '1' and redis.call('LPOS', KEYS[2], sid) then
    for j = i, i + n - 1 do
      if redis.call('LREM', queue, -1, ARGV[j]) == 1 then
        removed, removed_bytes = removed + 1, removed_bytes + #ARGV[j]
      end
    end
    for j = i + n, i + n + 2 * m - 1, 2 do
      local at = redis.call('LPOS', queue, ARGV[j], 'RANK', -1)
      if at then
        redis.call('LSET', queue, at, ARGV[j + 1])
        removed_bytes = removed_bytes + #ARGV[j] - #ARGV[j + 1]
      end
    end
    if release == '1' and redis.call('LLEN', queue) > 0 then
      redis.call('LPUSH', KEYS[1], sid)
    end
  end
  i = i + n + 2 * m
end
if removed > 0 or removed_bytes ~= 0 then
  redis.call('HINCRBY', KEYS[3], 'messages', 0 - removed)
  redis.call('HINCRBY', KEYS[3], 'bytes', 0 - removed_bytes)
end
return redis.call('LLEN', KEYS[1])
"""

# Tokens taken and not started go back to the front of the line, their messages untouched,
# each only if still held. KEYS: ready, processing; ARGV: queue prefix, then the sids,
# the last taken first.
_GIVE_BACK = """
local moved = 0
for i = 2, #ARGV do
  if redis.call('LREM', KEYS[2], 1, ARGV[i]) == 1 then
    if redis.call('LLEN', ARGV[1] .. ARGV[i]) > 0 then
      redis.call('RPUSH', KEYS[1], ARGV[i])
    end
    moved = moved + 1
  end
end
return moved
"""

# Tokens an app-node left half done go to the front of the line; each client's oldest
# message, if still the one read, is replaced by its next attempt or dead-lettered. KEYS:
# ready, processing, size, dead; ARGV: queue prefix, the dead-letter list's bound, then
# for each token: sid, oldest message ('' if none), its replacement, 'queue' or 'dead'.
# Returns how many went back, how many to the dead, how many old dead letters dropped.
_HAND_BACK = """
local back, dead, removed_bytes = 0, 0, 0
for i = 3, #ARGV, 4 do
  local sid, old, new = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local queue = ARGV[1] .. sid
  if redis.call('LREM', KEYS[2], 1, sid) == 1 then
    if old ~= '' and redis.call('LINDEX', queue, -1) == old then
      if ARGV[i + 3] == 'dead' then
        redis.call('RPOP', queue)
        redis.call('LPUSH', KEYS[4], new)
        dead, removed_bytes = dead + 1, removed_bytes + #old
      else
        redis.call('LSET', queue, -1, new)
        removed_bytes = removed_bytes + #old - #new
      end
    end
    if redis.call('LLEN', queue) > 0 then
      redis.call('RPUSH', KEYS[1], sid)
      back = back + 1
    end
  end
end
if dead > 0 or removed_bytes ~= 0 then
  redis.call('HINCRBY', KEYS[3], 'messages', 0 - dead)
  redis.call('HINCRBY', KEYS[3], 'bytes', 0 - removed_bytes)
end
local dropped = math.max(0, redis.call('LLEN', KEYS[4]) - tonumber(ARGV[2]))
if dropped > 0 then
  redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[2]) - 1)
end
return {back, dead, dropped}
"""

# A dead letter, the oldest dropped past the list's bound. KEYS: dead-letter list; ARGV:
# the record, the bound. Returns how many were dropped.
_DEAD = """
local length = redis.call('LPUSH', KEYS[1], ARGV[1])
local dropped = math.max(0, length - tonumber(ARGV[2]))
if dropped > 0 then
  redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
end
return dropped
"""

# A client of a dead io-node, or a parked one whose window closed, gets its disconnect only
# once. KEYS: node-clients or parked, ready, size; ARGV: queue prefix, sid, envelope, SREM/ZREM.
_DISCONNECT = """
if redis.call(ARGV[4], KEYS[1], ARGV[2]) == 1 then
  if redis.call('LPUSH', ARGV[1] .. ARGV[2], ARGV[3]) == 1 then
    redis.call('LPUSH', KEYS[2], ARGV[2])
  end
  redis.call('HINCRBY', KEYS[3], 'messages', 1)
  redis.call('HINCRBY', KEYS[3], 'bytes', #ARGV[3])
  return 1
end
return 0
"""


def _wire(raw) -> bytes:
    """A message as sent back to Redis: bytes it did not hold as UTF-8 (written there by
    something else) go back as they were, rather than fail the round trip (hiredis packs
    strings as strict UTF-8)."""
    return raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogateescape")


class Taken(NamedTuple):
    """A client taken: its sid, its session as stored (JSON or None), its oldest messages."""

    sid: str
    session: Optional[str]
    raws: List[str]


class Done(NamedTuple):
    """What an app-node did with a client it holds (`Inbox.finish`): messages off its queue,
    ``(old, new)`` retries to replace in place, and whether to release the token."""

    sid: str
    handled: Sequence[str] = ()
    retries: Sequence[Tuple[str, str]] = ()
    release: bool = True


class Inbox:
    """The client queues, the ready and processing lists, the dead-letter list, on redis-py
    client ``redis`` (``decode_responses=True``), with the bounds of `Config` ``config``.
    The dead-letter list keeps the newest ``dead_maxlen`` records, each cut to about
    ``dead_record_size`` bytes."""

    def __init__(self, redis, keys, config, share: int = 1):
        self.redis = redis
        self.keys = keys        # a shard's (`ShardKeys`), or those of a cluster of one shard
        self.max_attempts = config.max_attempts
        self.maxlen = max(1, config.inbox_maxlen // share)      # a shard's share of the bounds
        self.max_bytes = max(1, config.inbox_max_bytes // share)
        self.client_maxlen = config.client_queue_maxlen
        self.dead_maxlen, self.dead_record_size = config.dead_maxlen, config.dead_record_size
        (self._push, self._take, self._finish, self._give_back, self._hand_back, self._dead,
         self._disconnect) = (redis.register_script(script) for script in (
            _PUSH, _TAKE, _FINISH, _GIVE_BACK, _HAND_BACK, _DEAD, _DISCONNECT))
        self._taker, self._pusher = Direct(redis), Direct(redis)    # the hot paths

    # ---- io-nodes ---------------------------------------------------------------------------

    def push(self, batch: Sequence[Tuple[str, str, str]], records=(), state=None) -> List[int]:
        """Push ``(kind, sid, envelope)`` triples in order, with the client records of
        connects in the same transaction (``state.add_client``); returns the positions of
        the messages refused for space (the inbox's bounds, or the client's queue's)."""
        args = [self.keys.queue_prefix, self.maxlen, self.max_bytes, self.client_maxlen]
        for kind, sid, raw in batch:
            args += [kind, sid, raw]
        try:
            return self._push_once(args, records, state)
        except NoScriptError:
            # Redis restarted or its scripts were flushed: nothing of the batch was pushed
            # (the client records are set twice, harmless)
            self.redis.script_load(_PUSH)
            return self._push_once(args, records, state)

    def _push_once(self, args: list, records, state) -> List[int]:
        pipe = self.redis.pipeline(transaction=bool(records))    # MULTI only for records
        # by sha: redis-py would ask SCRIPT EXISTS in a round trip of its own first
        pipe.evalsha(self._push.sha, 2, self.keys.ready, self.keys.inbox_size, *args)
        for record in records:
            state.add_client(record, pipe)
        replies = self._pusher.execute(pipe)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return [int(index) for index in replies[0]]

    def push_disconnect(self, node: str, sid: str, envelope: str, pipe, parked=False) -> None:
        """Add to ``pipe``: the disconnect of a client of dead io-node ``node`` (``parked``: a
        parked one's), unless another reaper pushed it (the reply is 1 when this one did)."""
        guard = (self.keys.parked, "ZREM") if parked else (self.keys.node_clients(node), "SREM")
        self._disconnect(keys=[guard[0], self.keys.ready, self.keys.inbox_size],
                         args=[self.keys.queue_prefix, sid, envelope, guard[1]], client=pipe)

    # ---- app-nodes ----------------------------------------------------------------------------

    def take(self, processing: str, clients: int, per_client: int,
             timeout: float) -> Tuple[List[Taken], bool]:
        """Take up to ``clients`` clients (each with up to ``per_client`` messages) into
        ``processing`` in one round trip, blocking up to ``timeout`` seconds for the first;
        returns them and whether more wait. A blocking ``BLMOVE`` takes the first token
        and, pipelined behind it, a script reads its messages and takes the rest."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.blmove(self.keys.ready, processing, timeout, "RIGHT", "LEFT")
        pipe.evalsha(self._take.sha, 2, self.keys.ready, processing,
                     *self._take_args(clients - 1, per_client, peek=True))
        first, taken = self._taker.execute(pipe)
        if isinstance(first, Exception):
            raise first
        if isinstance(taken, NoScriptError):
            # Redis restarted or flushed its scripts: what BLMOVE took is read next time
            self.load_scripts()
            self.give_back(processing, [first] if first is not None else [])
            return [], True
        if isinstance(taken, Exception):
            raise taken
        groups, waiting = self._groups(taken)
        peeked = groups.pop(0)
        if first is not None:       # BLMOVE put it at our list's head, where the script read
            groups.insert(0, peeked)
        return groups, waiting

    def take_waiting(self, processing: str, clients: int, per_client: int):
        """`take` without blocking: the clients waiting, and whether more wait."""
        args = ("EVALSHA", self._take.sha, 2, self.keys.ready, processing,
                *self._take_args(clients, per_client, peek=False))
        try:
            return self._groups(self._taker.call(*args))
        except NoScriptError:
            self.load_scripts()
            return self._groups(self._taker.call(*args))

    def _take_args(self, clients: int, per_client: int, peek: bool) -> list:
        return [self.keys.queue_prefix, self.keys.session_prefix, max(0, clients), per_client,
                1 if peek else 0]

    @staticmethod
    def _groups(reply: list) -> Tuple[List[Taken], bool]:
        waiting, groups = reply[0], []
        for at in range(1, len(reply), 3):
            groups.append(Taken(reply[at], reply[at + 1], list(reversed(reply[at + 2]))))
        return groups, waiting > 0

    def finish(self, pipe, processing: str, done: Sequence[Done]) -> int:
        """Add to ``pipe``: what was done with held clients (`Done`). Returns the position
        of its reply in the pipeline: how many tokens wait in the ready list."""
        args = [self.keys.queue_prefix]
        for item in done:
            args += [item.sid, 1 if item.release else 0, len(item.handled), len(item.retries),
                     *map(_wire, item.handled), *(_wire(r) for pair in item.retries for r in pair)]
        position = len(pipe)
        pipe.evalsha(self._finish.sha, 3, self.keys.ready, processing, self.keys.inbox_size,
                     *args)
        return position

    def load_scripts(self) -> None:
        """Load the scripts pipelines call by sha (at start, and after Redis lost them)."""
        for script in (_FINISH, _TAKE):
            self.redis.script_load(script)

    def dead_letter(self, pipe, record: dict) -> int:
        """Add to ``pipe``: a record of a message given up on (``error``, ``raw``, ...).
        Returns the position of its reply in the pipeline: how many old records were
        dropped to keep the list's bound (for `dropped`)."""
        position = len(pipe)
        self._dead(keys=[self.keys.dead],
                   args=[self._record({**record, "ts": time.time()}), self.dead_maxlen],
                   client=pipe)
        return position

    def dropped(self, count: int) -> None:
        """Say that ``count`` old dead letters were dropped to keep the list's bound."""
        if count:
            logger.warning("the dead-letter list is at its bound (DEAD_MAXLEN %d): %d of its "
                           "oldest records dropped", self.dead_maxlen, count)

    def _record(self, record: dict) -> bytes:
        """A dead-letter record as stored: its message cut to ``dead_record_size`` bytes."""
        raw = record.get("raw")
        if isinstance(raw, str):
            data = raw.encode("utf-8", "surrogateescape")
            if len(data) > self.dead_record_size:
                record = {**record, "raw": data[:self.dead_record_size].decode("utf-8", "ignore"),
                          "raw_bytes": len(data), "cut": True}
        return _wire(dumps(record))

    def size(self) -> Tuple[int, int]:
        """Messages in the inbox (waiting or being handled) and their bytes."""
        return tuple(int(n or 0) for n in self.redis.hmget(self.keys.inbox_size, "messages",
                                                             "bytes"))

    def held(self, processing: str) -> List[str]:
        """The clients (sids) a processing list holds, the last taken first."""
        return self.redis.lrange(processing, 0, -1)

    def give_back(self, processing: str, sids: Sequence[str]) -> int:
        """Clients taken and not started (``sids`` in the order taken) go back to the
        front of the line, in order, their messages untouched. Returns how many."""
        if not sids:
            return 0
        return self._give_back(keys=[self.keys.ready, processing],
                               args=[self.keys.queue_prefix, *reversed(sids)])

    def hand_back(self, processing: str, node: str, error: str,
                  sids: Optional[List[str]] = None) -> Tuple[int, int]:
        """Clients an app-node left half done (all of ``processing`` unless ``sids``) go
        back to the front, each one's oldest message with ``attempt + 1``, or to the
        dead-letter list with ``error`` once tried ``max_attempts`` times. Returns how many
        clients went back and how many messages to the dead-letter list."""
        if sids is None:
            sids = self.held(processing)
        if not sids:
            return 0, 0
        pipe = self.redis.pipeline(transaction=False)
        for sid in sids:
            pipe.lindex(self.keys.queue(sid), -1)
        args = [self.keys.queue_prefix, self.dead_maxlen]
        for sid, raw in zip(sids, pipe.execute()):
            args += [sid, *map(_wire, self._next_attempt(raw, node, error))] if raw else \
                [sid, "", "", ""]
        back, dead, dropped = self._hand_back(
            keys=[self.keys.ready, processing, self.keys.inbox_size, self.keys.dead], args=args)
        self.dropped(dropped)
        return back, dead

    def _next_attempt(self, raw: str, node: str, error: str) -> tuple:
        """``(raw, what replaces it, 'queue' or 'dead')`` for a message handed back."""
        try:
            envelope = Envelope.decode(raw)
        except Exception as exc:
            record = {"error": f"malformed: {exc}", "raw": raw, "ts": time.time(),
                      "app_node": node}
            return raw, self._record(record), "dead"
        envelope.attempt += 1
        if envelope.attempt >= self.max_attempts:
            record = {"error": error, "raw": envelope.encode(), "ts": time.time(),
                      "app_node": node, "attempts": envelope.attempt}
            return raw, self._record(record), "dead"
        return raw, envelope.encode(), "queue"
