"""The inbox over its shards: each client's messages in the shard of its sid.

On one Redis the inbox is one shard, and `Inboxes` hands every call to its one `Inbox`. With
``SHARDS`` above 1 (6 by default on a Redis Cluster) each shard is an `Inbox` of its own
keys (`state.ShardKeys`), in one hash slot, and a client's queue, session and token stay in
its shard for good, so a client's messages keep their order. io-nodes push each client's
messages to its shard (the shards' round trips side by side); app-nodes take from every
shard (`lanes.Lane`); the inbox's bounds are shared out evenly among the shards::

    inboxes = Inboxes(redis, keys, config)
    refused = inboxes.push([("event", sid, raw)])
    inboxes.of(sid).take_waiting(processing, 16, 16)
"""

from typing import List, Sequence, Tuple

import gevent

from .inbox import Inbox
from .state import Keys


class Inboxes:
    """One `Inbox` per shard of ``keys`` (see the module)."""

    def __init__(self, redis, keys: Keys, config):
        self.keys = keys
        self.redis = redis
        count = len(keys.shards)
        self.shards: List[Inbox] = [Inbox(redis, shard, config, share=count)
                                    for shard in keys.shards]

    def __iter__(self):
        return iter(self.shards)

    def __len__(self) -> int:
        return len(self.shards)

    def of(self, sid: str) -> Inbox:
        """The inbox of a client's shard."""
        return self.shards[self.keys.shard(sid).index]

    @property
    def first(self) -> Inbox:
        return self.shards[0]

    def push(self, batch: Sequence[Tuple[str, str, str]], records=(), state=None) -> List[int]:
        """`Inbox.push` of each shard's part of ``batch``, the shards' round trips side by
        side; the positions in ``batch`` of what was refused for space."""
        if len(self.shards) == 1:
            return self.shards[0].push(batch, records, state)
        parts = {}      # shard -> positions in the batch, its items, its records
        for position, item in enumerate(batch):
            part = parts.setdefault(self.keys.shard(item[1]).index, ([], [], []))
            part[0].append(position)
            part[1].append(item)
        for record in records:
            part = parts.setdefault(self.keys.shard(record["sid"]).index, ([], [], []))
            part[2].append(record)
        jobs = [(positions, gevent.spawn(_outcome, self.shards[index].push, items,
                                         shard_records, state))
                for index, (positions, items, shard_records) in parts.items()]
        gevent.joinall([job for _, job in jobs])
        refused = []
        for positions, job in jobs:
            value, error = job.value
            if error is not None:
                raise error     # Redis away: the whole batch is pushed again later
            refused.extend(positions[index] for index in value)
        return sorted(refused)

    def push_disconnect(self, node: str, sid: str, envelope: str, pipe, parked=False) -> None:
        self.of(sid).push_disconnect(node, sid, envelope, pipe, parked)

    def load_scripts(self) -> None:
        self.shards[0].load_scripts()       # one Redis, or every master of a cluster

    def size(self) -> Tuple[int, int]:
        """Messages in the inbox (every shard's) and their bytes."""
        if len(self.shards) == 1:
            return self.shards[0].size()
        pipe = self.redis.pipeline(transaction=False)
        for inbox in self.shards:
            pipe.hmget(inbox.keys.inbox_size, "messages", "bytes")
        sizes = pipe.execute()
        return (sum(int(m or 0) for m, _ in sizes), sum(int(b or 0) for _, b in sizes))

    def held(self, node: str) -> int:
        """Clients the processing lists of app-node ``node`` hold, in every shard."""
        pipe = self.redis.pipeline(transaction=False)
        for inbox in self.shards:
            pipe.llen(inbox.keys.processing(node))
        return sum(pipe.execute())

    def hand_back(self, node: str, error: str) -> Tuple[int, int]:
        """`Inbox.hand_back` of everything app-node ``node`` held, in every shard."""
        back = dead = 0
        for inbox in self.shards:
            b, d = inbox.hand_back(inbox.keys.processing(node), node, error=error)
            back, dead = back + b, dead + d
        return back, dead

    def dropped(self, count: int) -> None:
        self.shards[0].dropped(count)


def _outcome(call, *args):
    """``(value, None)`` or ``(None, the exception)``: raised again by the caller, not
    printed by gevent as a greenlet that died."""
    try:
        return call(*args), None
    except Exception as exc:
        return None, exc
