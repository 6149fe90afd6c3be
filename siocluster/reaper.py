"""The reaper: cleans up after nodes that died without saying goodbye.

App-nodes run it (`AppNode` starts a `Reaper` in a greenlet). A node is dead when its
``<prefix>:alive:<id>`` key expired: no heartbeat for ``node_ttl`` seconds. One pass, done
by one app-node at a time under a short Redis lock about once per heartbeat interval:

- a dead **app-node**: the messages in its processing list go back to the inbox with
  ``attempt + 1``, first in line; a message already tried ``max_attempts`` times goes to the
  dead-letter list instead, with the error "app-node ... died while handling it" (a
  message that keeps killing its app-node);
- a dead **io-node**: each of its clients gets a synthesized ``disconnect`` envelope (reason
  ``"io-node died"``), so the app tier runs its disconnect handler and forgets the client
  (presence, rooms, client record, session); then its command stream is deleted;
- then its registry entry goes, and a tombstone tells the node, should it come back (a long
  pause, a network partition), that the cluster gave up on it (see `Node.reaped`).

So a dead node is cleaned up at most ``node_ttl`` plus about two heartbeat intervals after
its last heartbeat (14 s with the defaults). Every move is a script that takes a message or
a client only if it is still there, so two reapers never handle one twice.

Right after Redis restarted, or this node's own connection came back, live nodes may not
have heartbeated yet: no pass runs until every live node had time to (`grace`)::

    reaper = Reaper(node)
    reaper.step()        # one pass if it is this node's turn; returns what it cleaned
"""

import json
import logging
import time
from typing import Dict, List, Optional, Tuple

from redis.exceptions import ResponseError

from . import defaults
from .envelope import Envelope, dumps
from .state import chunks

DIED_REASON = "io-node died"
TOMBSTONE_TTL = 24 * 3600     # seconds a dead node's tombstone waits for the node to return

# Move messages out of a processing list, each only if it is still there: a message is
# handed over by whoever removed it. In one script, so consumers blocked on the inbox see
# them all at once, in order. KEYS: source, inbox, dead-letter list; ARGV: for each message
# (newest first, as LRANGE gives them) the message, what to push, and "inbox" (to the
# front, where consumers pop) or "dead". Returns how many went to the inbox and the dead.
MOVE = """
local inbox, dead = 0, 0
for i = 1, #ARGV, 3 do
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
return {inbox, dead}
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

# KEYS: lock; ARGV: owner. Released only by its owner.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def tombstone_key(keys, node: str) -> str:
    """Exists while a node the reaper cleaned up has not heartbeated since."""
    return f"{keys.prefix}:reaped:{node}"


def lock_key(keys) -> str:
    return f"{keys.prefix}:reaper"


def requeue(redis, keys, source: str, raws: List[str], *, max_attempts: int, error: str,
            node: str, count_attempt: bool = True, script=None) -> Tuple[int, int]:
    """Give messages of ``source`` (a processing list; ``raws`` newest first, as LRANGE
    gives them) back to the inbox, first in line and in order, with ``attempt + 1``;
    dead-letter one once tried ``max_attempts`` times, with ``error``. Messages someone
    else took first are skipped. Returns how many went to the inbox and to the dead."""
    if not raws:
        return 0, 0
    args = []
    for raw in raws:
        try:
            envelope = Envelope.decode(raw)
        except Exception as exc:
            record = {"error": f"malformed: {exc}", "raw": raw, "ts": time.time(),
                      "app_node": node}
            args += [raw, dumps(record), "dead"]
            continue
        if count_attempt:
            envelope.attempt += 1
        if envelope.attempt >= max_attempts:
            record = {"error": error, "raw": envelope.encode(), "ts": time.time(),
                      "app_node": node, "attempts": envelope.attempt}
            args += [raw, dumps(record), "dead"]
        else:
            args += [raw, envelope.encode(), "inbox"]
    move = script or redis.register_script(MOVE)
    inbox, dead = move(keys=[source, keys.inbox, keys.dead], args=args)
    return inbox, dead


class Reaper:
    """Cleans up after dead nodes on behalf of ``node`` (an app-node).

    :param node: the `Node` whose Redis client, keys, config and logger it uses.
    """

    def __init__(self, node):
        self.node = node
        self.redis = node.redis
        self.keys = node.keys
        self.config = node.config
        self.logger = logging.getLogger("siocluster.reaper")
        self._move = self.redis.register_script(MOVE)
        self._disconnect = self.redis.register_script(_DISCONNECT)
        self._condemn = self.redis.register_script(_CONDEMN)
        self._bury = self.redis.register_script(_BURY)
        self._unlock = self.redis.register_script(_UNLOCK)

    @property
    def grace(self) -> float:
        """Seconds every live node needs to heartbeat again after Redis came back: a
        reconnect backoff at its cap, then a heartbeat interval or two."""
        c = self.config
        return max(c.node_ttl, defaults.RECONNECT_BACKOFF_MAX + 2 * c.heartbeat_interval)

    def ready(self) -> bool:
        """Whether live nodes have had time to heartbeat since Redis (re)started and since
        this node's own connection came back."""
        if time.time() - self.node.redis_up_since < self.grace:
            return False
        try:
            uptime = float(self.redis.info("server").get("uptime_in_seconds", 0))
        except ResponseError:
            return True    # INFO renamed away (some hosted Redis): rely on our own view
        return uptime >= self.grace

    def step(self) -> Dict[str, List[str]]:
        """One pass if no other reaper holds the lock; returns the ids of the nodes it
        buried by role (``{}`` when it was not this node's turn)."""
        asked = time.monotonic()
        if not self.ready():
            return {}
        lock_ms = max(100, int(self.config.heartbeat_interval * 1000))
        # the lock is left to expire, not released: one pass per heartbeat interval however
        # many app-nodes try
        if not self.redis.set(lock_key(self.keys), self.node.id, nx=True, px=lock_ms):
            return {}
        if time.monotonic() - asked > self.config.heartbeat_interval:
            # Redis was slow to answer (paused, swapping): other nodes' heartbeats may be
            # waiting in line behind our questions, so judge no one this round
            return {}
        return self.reap()

    def reap(self) -> Dict[str, List[str]]:
        """Clean up every node found dead now (no lock: scripts keep it safe anyway)."""
        buried: Dict[str, List[str]] = {}
        for node, info in self.node.state.nodes(alive=False).items():
            if node == self.node.id:
                continue      # our own key lapsed while we were cut off: nothing to hand over
            if not self._condemn(keys=[self.keys.alive(node), tombstone_key(self.keys, node)],
                                 args=[TOMBSTONE_TTL]):
                continue      # it heartbeated meanwhile
            role = info.get("role")
            self.logger.warning("reaper on %s: %s %s has not heartbeated for %.0fs, cleaning "
                                "up after it", self.node.id, role or "node", node,
                                self.config.node_ttl)
            if role == "io-node":
                self.reap_io_node(node)
            else:
                self.reap_app_node(node)
            if self._bury(keys=[self.keys.alive(node), self.keys.nodes,
                                self.keys.processing(node), self.keys.node_clients(node),
                                self.keys.node_commands(node)], args=[node]):
                buried.setdefault(role or "node", []).append(node)
        return buried

    def reap_app_node(self, node: str) -> Dict[str, int]:
        """Hand the messages a dead app-node was handling to the others."""
        source = self.keys.processing(node)
        # a processing list is small: at most a batch (16) per worker of its app-node
        inbox, dead = requeue(self.redis, self.keys, source, self.redis.lrange(source, 0, -1),
                              max_attempts=self.config.max_attempts, node=node,
                              error=f"app-node {node} died while handling it",
                              script=self._move)
        if inbox or dead:
            self.logger.warning("reaper on %s: %d message(s) of dead app-node %s back in the "
                                "inbox, %d dead-lettered (tried %d times)", self.node.id,
                                inbox, node, dead, self.config.max_attempts)
        return {"inbox": inbox, "dead": dead}

    def reap_io_node(self, node: str) -> int:
        """Tell the app tier that every client of a dead io-node disconnected."""
        sent = 0
        sids = list(self.redis.sscan_iter(self.keys.node_clients(node), count=500))
        for batch in chunks(sids, 500):
            records = self.redis.hmget(self.keys.clients, batch)
            pipe = self.redis.pipeline(transaction=False)
            stale = []
            for sid, raw in zip(batch, records):
                record = _record(raw)
                if record is None:
                    # no record: its client left already, only the set entry lingered
                    stale.append(sid)
                    continue
                envelope = Envelope("disconnect", record.get("namespace") or "/", sid, node,
                                    record.get("info") or {}, reason=DIED_REASON)
                self._disconnect(keys=[self.keys.node_clients(node), self.keys.inbox],
                                 args=[sid, envelope.encode()], client=pipe)
            if stale:
                pipe.srem(self.keys.node_clients(node), *stale)
            results = pipe.execute()
            sent += sum(1 for result in results[:len(results) - bool(stale)] if result == 1)
        self.logger.warning("reaper on %s: dead io-node %s held %d client(s); their "
                            "disconnects are in the inbox", self.node.id, node, sent)
        return sent


def _record(raw: Optional[str]) -> Optional[dict]:
    if not raw:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


