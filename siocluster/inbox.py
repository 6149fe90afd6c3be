"""The inbox protocol, end to end: every move of a client message between Redis lists.

io-nodes `push` envelopes to ``<prefix>:inbox`` (LPUSH, so consumers popping the right end
see them in order). An app-node `take`s them into its own processing list
(``<prefix>:processing:<id>``, ``BLMOVE`` and a script for more), and when a message is
handled it is `finish`\\ ed (LREM), `retry`\\ ed or `dead_letter`\\ ed in the round trip that
writes its handler's commands. So a crash leaves every message either in the inbox or in
a processing list, where the reaper finds it: delivery is at least once.

Where a message goes back, in one place:

- a **retry** (its handler raised) goes to the back of the line, ``attempt + 1``;
- a **give-back** (taken, never started: a stop, a flush, a lost pop reply) goes to the
  front, in order, its attempt unchanged;
- a **hand-back** (its app-node died or stopped with it half done) goes to the front with
  ``attempt + 1``, to the dead-letter list once tried ``max_attempts`` times.

The class returns values and adds to pipelines it is given; it never calls back into a
node::

    inbox = Inbox(redis, keys, config)
    raws, more = inbox.take(processing, wanted=16, timeout=1.0)
    inbox.give_back(processing, raws[1:], node="app-node-1")
"""

import logging
import time
from typing import List, Optional, Sequence, Tuple

from redis.exceptions import NoScriptError

from .envelope import Envelope, dumps
from .state import Keys

logger = logging.getLogger("siocluster.inbox")

# Push a batch of envelopes in order, refusing connects and events that would take the
# inbox over its maximum length or size (MEMORY USAGE estimates it from a few elements);
# a disconnect is never refused (its client is gone either way, and the app tier must hear
# of it). KEYS: inbox; ARGV: maxlen, max bytes, then kind and envelope for each. Returns
# the 0-based positions of the refused ones.
_PUSH = """
local room = tonumber(ARGV[1]) - redis.call('LLEN', KEYS[1])
local bytes = tonumber(ARGV[2]) - (redis.call('MEMORY', 'USAGE', KEYS[1], 'SAMPLES', '5') or 0)
local refused = {}
for i = 3, #ARGV, 2 do
  local size = #ARGV[i + 1]
  if ARGV[i] == 'disconnect' or (room > 0 and bytes >= size) then
    redis.call('LPUSH', KEYS[1], ARGV[i + 1])
    room = room - 1
    bytes = bytes - size
  else
    refused[#refused + 1] = (i - 3) / 2
  end
end
return refused
"""

# Move up to ARGV[1] messages from the inbox to a processing list, as BLMOVE does one, in
# one script: a crash leaves each either in the inbox or in the processing list. KEYS:
# inbox, processing. Returns the messages, oldest first, then how many still wait.
_TAKE = """
local taken = {}
for i = 1, tonumber(ARGV[1]) do
  local raw = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not raw then
    break
  end
  taken[#taken + 1] = raw
end
taken[#taken + 1] = redis.call('LLEN', KEYS[1])
return taken
"""

# Move messages out of a processing list, each only if it is still there: a message is
# handed over by whoever removed it. In one script, so consumers blocked on the inbox see
# them all at once, in order. KEYS: source, inbox, dead-letter list; ARGV: the dead-letter
# list's bound, then for each message (newest first, as LRANGE gives them) the message, what
# to push, and "inbox" (to the front, where consumers pop) or "dead". Returns how many went
# to the inbox and the dead, and how many old dead letters were dropped for them.
_MOVE = """
local inbox, dead = 0, 0
for i = 2, #ARGV, 3 do
  if redis.call('LREM', KEYS[1], 1, ARGV[i]) == 1 then
    if ARGV[i + 2] == 'inbox' then
      redis.call('RPUSH', KEYS[2], ARGV[i + 1])
      inbox = inbox + 1
    else
      redis.call('LPUSH', KEYS[3], ARGV[i + 1])
      dead = dead + 1
    end
  end
end
local dropped = math.max(0, redis.call('LLEN', KEYS[3]) - tonumber(ARGV[1]))
if dropped > 0 then
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[1]) - 1)
end
return {inbox, dead, dropped}
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

# A client of a dead io-node gets its disconnect only once. KEYS: node-clients, inbox;
# ARGV: sid, envelope.
_DISCONNECT = """
if redis.call('SREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[2])
  return 1
end
return 0
"""


class Inbox:
    """The cluster's inbox, its processing lists and its dead-letter list.

    :param redis: a redis-py client with ``decode_responses=True``.
    :param keys: the cluster's `Keys`.
    :param config: the `Config` whose bounds it keeps: ``max_attempts``, ``inbox_maxlen``,
        ``inbox_max_bytes``, ``dead_maxlen`` and ``dead_record_size``.

    The dead-letter list keeps the newest ``dead_maxlen`` records, each at most about
    ``dead_record_size`` bytes (a larger message is cut, its size noted), so it never holds
    more than their product.
    """

    def __init__(self, redis, keys: Keys, config):
        self.redis = redis
        self.keys = keys
        self.max_attempts = config.max_attempts
        self.maxlen, self.max_bytes = config.inbox_maxlen, config.inbox_max_bytes
        self.dead_maxlen, self.dead_record_size = config.dead_maxlen, config.dead_record_size
        self._push = redis.register_script(_PUSH)
        self._take = redis.register_script(_TAKE)
        self._move = redis.register_script(_MOVE)
        self._dead = redis.register_script(_DEAD)
        self._disconnect = redis.register_script(_DISCONNECT)

    # ---- io-nodes ---------------------------------------------------------------------------

    def push(self, batch: Sequence[Tuple[str, str]], records=(), state=None) -> List[int]:
        """Push ``(kind, envelope)`` pairs in order, with the client records of connects in
        the same transaction (``state.add_client``), so an app-node that takes a connect
        finds its record. Returns the positions of the messages refused for space (the
        inbox's length or size bound)."""
        args = [self.maxlen, self.max_bytes]
        for kind, raw in batch:
            args += [kind, raw]
        try:
            return self._push_once(args, records, state)
        except NoScriptError:
            # Redis restarted or its scripts were flushed: nothing of the batch was pushed
            # (the client records are set twice, harmless)
            self.redis.script_load(_PUSH)
            return self._push_once(args, records, state)

    def _push_once(self, args: list, records, state) -> List[int]:
        pipe = self.redis.pipeline(transaction=True)
        # by sha: redis-py would ask SCRIPT EXISTS in a round trip of its own first
        pipe.evalsha(self._push.sha, 1, self.keys.inbox, *args)
        for record in records:
            state.add_client(record, pipe)
        return [int(index) for index in pipe.execute()[0]]

    def push_disconnect(self, node: str, sid: str, envelope: str, pipe) -> None:
        """Add to ``pipe``: the disconnect of a client of dead io-node ``node``, pushed only
        if no other reaper pushed it (the pipeline's reply is 1 when this one did)."""
        self._disconnect(keys=[self.keys.node_clients(node), self.keys.inbox],
                         args=[sid, envelope], client=pipe)

    # ---- app-nodes ----------------------------------------------------------------------------

    def take(self, processing: str, wanted: int, timeout: float) -> Tuple[List[str], bool]:
        """Take up to ``wanted`` messages into ``processing`` in one round trip, oldest
        first, blocking up to ``timeout`` seconds for the first; returns them and whether
        more wait. A blocking ``BLMOVE`` takes the first and, pipelined behind it, a script
        the rest."""
        keys = (self.keys.inbox, processing)
        if wanted <= 1:
            raw = self.redis.blmove(*keys, timeout, "RIGHT", "LEFT")
            return ([] if raw is None else [raw]), False
        pipe = self.redis.pipeline(transaction=False)
        pipe.blmove(*keys, timeout, "RIGHT", "LEFT")
        # by sha: redis-py would ask SCRIPT EXISTS in a round trip of its own first
        pipe.evalsha(self._take.sha, 2, *keys, wanted - 1)
        first, taken = pipe.execute(raise_on_error=False)
        if isinstance(first, Exception):
            raise first
        if isinstance(taken, NoScriptError):
            # Redis restarted or flushed its scripts: load it for the next take
            self.redis.script_load(_TAKE)
            taken = [1]
        elif isinstance(taken, Exception):
            raise taken
        *raws, waiting = taken
        return (raws if first is None else [first, *raws]), waiting > 0

    def take_waiting(self, processing: str, count: int) -> Tuple[List[str], bool]:
        """Take up to ``count`` waiting messages without blocking; returns them and
        whether more wait."""
        *raws, waiting = self._take(keys=[self.keys.inbox, processing], args=[count])
        return raws, waiting > 0

    def finish(self, pipe, processing: str, raw: str) -> None:
        """Add to ``pipe``: the message is done, off the processing list."""
        pipe.lrem(processing, 1, raw)

    def retry(self, pipe, envelope: Envelope) -> None:
        """Add to ``pipe``: the message (its ``attempt`` already counted) to the back of
        the line."""
        pipe.lpush(self.keys.inbox, envelope.encode())

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

    def _record(self, record: dict) -> str:
        """A dead-letter record as stored: its message cut to ``dead_record_size`` bytes."""
        raw = record.get("raw")
        if isinstance(raw, str):
            data = raw.encode("utf-8", "surrogateescape")
            if len(data) > self.dead_record_size:
                record = {**record, "raw": data[:self.dead_record_size].decode("utf-8", "ignore"),
                          "raw_bytes": len(data), "cut": True}
        return dumps(record)

    def waiting(self, pipe) -> None:
        """Add to ``pipe``: how many messages wait in the inbox."""
        pipe.llen(self.keys.inbox)

    def held(self, processing: str) -> List[str]:
        """The messages in a processing list, newest first."""
        return self.redis.lrange(processing, 0, -1)

    def give_back(self, processing: str, raws: List[str], node: str) -> None:
        """Messages taken and not started (``raws`` oldest first) go back to the front of
        the line, in order, their attempt unchanged."""
        self._requeue(processing, raws[::-1], node=node, error="", count_attempt=False)

    def hand_back(self, processing: str, node: str, error: str,
                  raws: Optional[List[str]] = None) -> Tuple[int, int]:
        """Messages an app-node left half done (all of ``processing`` unless ``raws``,
        newest first) go back to the front with ``attempt + 1``, or to the dead-letter list
        with ``error`` once tried ``max_attempts`` times. Returns how many went each way."""
        if raws is None:
            raws = self.held(processing)
        return self._requeue(processing, raws, node=node, error=error, count_attempt=True)

    def _requeue(self, source: str, raws: List[str], *, node: str, error: str,
                 count_attempt: bool) -> Tuple[int, int]:
        if not raws:
            return 0, 0
        args = [self.dead_maxlen]
        for raw in raws:
            try:
                envelope = Envelope.decode(raw)
            except Exception as exc:
                record = {"error": f"malformed: {exc}", "raw": raw, "ts": time.time(),
                          "app_node": node}
                args += [raw, self._record(record), "dead"]
                continue
            if count_attempt:
                envelope.attempt += 1
            if envelope.attempt >= self.max_attempts:
                record = {"error": error, "raw": envelope.encode(), "ts": time.time(),
                          "app_node": node, "attempts": envelope.attempt}
                args += [raw, self._record(record), "dead"]
            else:
                args += [raw, envelope.encode(), "inbox"]
        inbox, dead, dropped = self._move(keys=[source, self.keys.inbox, self.keys.dead],
                                          args=args)
        self.dropped(dropped)
        return inbox, dead
