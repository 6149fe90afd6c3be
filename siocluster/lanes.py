"""How an app-node takes clients from the inbox: one lane per shard.

`Taking` is the part of `AppNode` that takes turns. Each shard of the inbox is a `Lane` of
the app-node: its `Inbox`, this node's processing list in the shard, and workers of its
own (worker ``n`` serves lane ``n % shards``), so every app-node takes from every shard and
the shards are consumed fairly. In a lane one worker at a time waits on the shard's ready
list (`Inbox.take`), taking as many clients as its lane has idle workers; the turns it does
not run itself wait in the lane's ``ready`` for the others. On one Redis there is one lane.
"""

import collections
import functools
from typing import Dict, List, Optional

import gevent.lock

from .inbox import Inbox, Taken
from .turn import Turn

# Clients a worker takes at once when more wait, besides one, and messages of one client:
# one round trip to take them and one to write all their commands halves the app-node's
# CPU per message under load, while a batch stays short enough (a few ms of handlers) not
# to delay its first acks. 47 rather than 15: on a saturated machine a backlog of clients
# then drains in fewer, larger takes, the same CPU per message with half the queue (the
# chat at 3,844 messages/s: p99 75-84 ms against 108-158, BENCHMARKS.md).
TAKE_MORE = 47
PER_CLIENT = 16


class Lane:
    """One shard of the inbox as app-node ``node`` takes from it."""

    def __init__(self, inbox: Inbox, node: str):
        self.inbox = inbox
        self.processing = inbox.keys.processing(node)
        self.taking = gevent.lock.Semaphore()   # one worker waits on the shard at a time
        self.more = False           # the last round trip saw clients waiting in the shard
        self.ready = collections.deque()    # turns taken, not started: for the next worker
        self.workers = 0            # workers serving this lane
        self.busy = 0               # of those, running handlers
        # after a Redis blip: None, True (look at the processing list), or the set of
        # clients no worker held at the first look (given back if still unheld at the next)
        self.recover_due = None


class Taking:
    """The taking half of `AppNode` (a mixin: it uses the node's config, inbox, stopping
    event and ``_inflight``)."""

    def _init_lanes(self) -> None:
        self.lanes = [Lane(inbox, self.id) for inbox in self.inbox]
        self._busy = 0           # workers running handlers
        self._inflight: Dict[str, int] = {}   # clients (sids) the workers hold right now

    def _spawn_workers(self) -> None:
        for n in range(max(self.config.workers, len(self.lanes))):
            lane = self.lanes[n % len(self.lanes)]
            lane.workers += 1
            self.spawn_loop(functools.partial(self._work_step, lane), f"worker-{n}")

    def _work_step(self, lane: Lane):
        first = self._next_turn(lane)
        if first is None:
            return
        self._busy += 1
        lane.busy += 1
        try:
            self.handle_batch([first])
        finally:
            self._busy -= 1
            lane.busy -= 1

    def _next_turn(self, lane: Lane) -> Optional[Turn]:
        """The next turn for this worker: one taken already and not started, else the
        first of a take (the rest wait in the lane's ``ready`` for this and idle workers)."""
        while not lane.ready:
            with lane.taking:
                if lane.ready:
                    break        # another worker's take while this one waited its turn
                if self.stopping.is_set():
                    return None
                turns = [Turn(taken, lane) for taken in self._take(lane)]
                if not turns:
                    return None
                # registered before anything can yield, so `_recover` never takes them
                for turn in turns:
                    self._inflight[turn.sid] = self._inflight.get(turn.sid, 0) + 1
                if self.stopping.is_set():
                    # taken while stop() waited: not ours to start any more
                    self._give_back(turns)
                    return None
                lane.ready.extend(turns[1:])
                return turns[0]
        return lane.ready.popleft()

    def _take(self, lane: Lane) -> List[Taken]:
        """Take as many clients as the lane has idle workers (all of `TAKE_MORE` + 1 while
        a backlog waits) in one round trip. One worker at a time waits on the shard, so
        clients that arrive together are taken together (with many workers each blocked
        on ``BLMOVE``, Redis would hand a burst out one per worker)."""
        if lane.more:
            taken, lane.more = lane.inbox.take_waiting(lane.processing, TAKE_MORE + 1,
                                                       PER_CLIENT)
            self._redis_back()
            if taken:
                return taken
        wanted = min(TAKE_MORE + 1, lane.workers - lane.busy)
        taken, lane.more = lane.inbox.take(lane.processing, wanted, PER_CLIENT,
                                           self.config.pop_timeout)
        self._redis_back()
        return taken

    def _give_back(self, turns: List[Turn]) -> None:
        try:
            for lane in self.lanes:
                mine = [turn.sid for turn in turns if turn.lane is lane]
                if mine:
                    lane.inbox.give_back(lane.processing, mine)
        finally:
            # given back or not (Redis away), no worker holds them now: if they are still in
            # the processing list when Redis returns, `_recover` gives them back
            self._release(turn.sid for turn in turns)

    def _give_back_ready(self, lanes=None) -> None:
        """Turns taken and not started by any worker (of ``lanes``, all by default) go
        back to the inbox."""
        for lane in self.lanes if lanes is None else lanes:
            if lane.ready:
                unstarted, lane.ready = list(lane.ready), collections.deque()
                self._give_back(unstarted)

    def _release(self, sids) -> None:
        """Clients finished or given back are no longer held by this process."""
        for sid in sids:
            count = self._inflight.get(sid, 0)
            if count > 1:
                self._inflight[sid] = count - 1
            else:
                self._inflight.pop(sid, None)

    def _hand_back_held(self, error: str) -> int:
        """What is left in our processing lists (its handler was killed) goes back to the
        inbox; returns how many clients."""
        left = 0
        for lane in self.lanes:
            sids = lane.inbox.held(lane.processing)
            lane.inbox.hand_back(lane.processing, self.id, sids=sids, error=error)
            left += len(sids)
        return left

    def redis_returned(self) -> None:
        for lane in self.lanes:
            lane.recover_due = True

    def _recover(self) -> None:
        """After a Redis blip, give back the clients of our processing lists that no worker
        holds: a take whose reply was lost with the connection never reached a worker."""
        for lane in self.lanes:
            if lane.recover_due is None:
                continue
            unheld = {sid for sid in lane.inbox.held(lane.processing)
                      if sid not in self._inflight}
            if lane.recover_due is True:
                # a take's reply may be on its way to a worker right now: look again next round
                lane.recover_due = unheld or None
                continue
            orphans, lane.recover_due = unheld & lane.recover_due, None
            lane.inbox.give_back(lane.processing, list(orphans))
            if orphans:
                self.logger.warning("app-node %s: %d client(s) taken while Redis went away "
                                    "went back to the inbox", self.id, len(orphans))
