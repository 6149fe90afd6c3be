"""The reaper: cleans up after nodes that died without saying goodbye.

App-nodes run it (`AppNode` starts a `Reaper` in a greenlet). A node is dead when its
``<prefix>:alive:<id>`` key expired: no heartbeat for ``node_ttl`` seconds. One pass, done
by one app-node at a time under a short Redis lock about once per heartbeat interval:

- a dead **app-node**: the clients in its processing list go back to the front of the
  line, each one's oldest message with ``attempt + 1``; a message already tried
  ``max_attempts`` times goes to the dead-letter list instead, with the error "app-node ...
  died while handling it" (a message that keeps killing its app-node);
- a dead **io-node**: each of its clients gets a synthesized ``disconnect`` envelope (reason
  ``"io-node died"``), so the app tier runs its disconnect handler and forgets the client
  (presence, rooms, client record, session); then its command stream is deleted. With
  connection-state recovery the envelope is parked instead: the client may come back as
  itself on another io-node within the window;
- a **parked client** whose window closed (`siocluster.recovery`) gets its disconnect;
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

import logging
import time
from typing import Dict, List

from redis.exceptions import ResponseError

from . import defaults
from .connection import is_cluster
from .envelope import Envelope
from .state import chunks, parse_record

DIED_REASON = "io-node died"


class Reaper:
    """Cleans up after dead nodes on behalf of ``node`` (an app-node).

    :param node: the `AppNode` whose Redis client, keys, config, cluster state and inbox
        it uses.
    """

    def __init__(self, node):
        self.node = node
        self.redis = node.redis
        self.keys = node.keys
        self.config = node.config
        self.state = node.state
        self.inbox = node.inbox
        self.logger = logging.getLogger("siocluster.reaper")

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
            if is_cluster(self.redis):      # the master of the registry's slot
                node = self.redis.get_node_from_key(self.keys.nodes)
                info = self.redis.info("server", target_nodes=node)
            else:
                info = self.redis.info("server")
            uptime = float(info.get("uptime_in_seconds", 0))
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
        if not self.redis.set(self.keys.reaper_lock, self.node.id, nx=True, px=lock_ms):
            return {}
        if time.monotonic() - asked > self.config.heartbeat_interval:
            # Redis was slow to answer (paused, swapping): other nodes' heartbeats may be
            # waiting in line behind our questions, so judge no one this round
            return {}
        return self.reap()

    def reap(self) -> Dict[str, List[str]]:
        """Clean up every node found dead now, and every parked client whose window closed
        (no lock: scripts keep it safe anyway)."""
        if self.node.recovery.enabled:
            self.expire_parked()
        buried: Dict[str, List[str]] = {}
        for node, info in self.state.nodes(alive=False).items():
            if node == self.node.id:
                continue      # our own key lapsed while we were cut off: nothing to hand over
            if not self.state.condemn(node):
                continue      # it heartbeated meanwhile
            role = info.get("role")
            self.logger.warning("reaper on %s: %s %s has not heartbeated for %.0fs, cleaning "
                                "up after it", self.node.id, role or "node", node,
                                self.config.node_ttl)
            if role == "io-node":
                self.reap_io_node(node)
            else:
                self.reap_app_node(node)
            if self.state.bury(node):
                buried.setdefault(role or "node", []).append(node)
        return buried

    def reap_app_node(self, node: str) -> Dict[str, int]:
        """Hand the clients a dead app-node was handling to the others."""
        # a processing list is small: at most a take (16 clients) per worker of its app-node
        inbox, dead = self.inbox.hand_back(node, error=f"app-node {node} died while handling it")
        if inbox or dead:
            self.logger.warning("reaper on %s: %d client(s) of dead app-node %s back in the "
                                "inbox, %d dead-lettered (tried %d times)", self.node.id,
                                inbox, node, dead, self.config.max_attempts)
        return {"inbox": inbox, "dead": dead}

    def reap_io_node(self, node: str) -> int:
        """Tell the app tier that every client of a dead io-node disconnected."""
        sent = 0
        for shard in self.keys.shards:
            sent += self._reap_io_node_shard(node, shard)
        self.logger.warning("reaper on %s: dead io-node %s held %d client(s); their "
                            "disconnects are in the inbox%s", self.node.id, node, sent,
                            ", or parked for them to come back as themselves"
                            if self.node.recovery.enabled else "")
        return sent

    def _reap_io_node_shard(self, node: str, shard) -> int:
        sent = 0
        sids = list(self.redis.sscan_iter(shard.node_clients(node), count=500))
        for batch in chunks(sids, 500):
            records = self.redis.hmget(shard.clients, batch)
            pipe = self.redis.pipeline(transaction=False)
            stale = []
            for sid, raw in zip(batch, records):
                record = parse_record(raw)
                if record is None:
                    # no record: its client left already, only the set entry lingered
                    stale.append(sid)
                    continue
                envelope = Envelope("disconnect", record.get("namespace") or "/", sid, node,
                                    record.get("info") or {}, reason=DIED_REASON)
                if record.get("pid") and self.node.recovery.enabled:
                    envelope.conn = record.get("conn")
                    self.node.recovery.park(pipe, sid, "", node, envelope.encode())
                else:
                    self.inbox.push_disconnect(node, sid, envelope.encode(), pipe)
            if stale:
                pipe.srem(shard.node_clients(node), *stale)
            results = pipe.execute()
            sent += sum(1 for result in results[:len(results) - bool(stale)] if result == 1)
        return sent

    def expire_parked(self) -> int:
        """Push the disconnect of every parked client whose window closed."""
        pushed = 0
        for shard in self.keys.shards:
            while True:
                due = self.node.recovery.due(shard)
                if not due:
                    break
                pipe = self.redis.pipeline(transaction=False)
                for sid, raw in due:
                    self.inbox.push_disconnect("", sid, raw, pipe, parked=True)
                    pipe.hdel(shard.parked_disconnects, sid)
                pushed += sum(1 for result in pipe.execute()[::2] if result == 1)
                if len(due) < 500:
                    break
        return pushed
