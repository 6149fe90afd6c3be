"""How an app-node writes what its client turns left: one round trip for many.

`Finisher` is the part of `AppNode` that finishes turns: the sessions, `App.writes`,
commands and client state they left, their messages off their queues, their clients
released (`add_finish`), in one pipeline for all the turns workers finished meanwhile (a
group commit), retried while Redis is unreachable, and handed back to the inbox when it
cannot be written at all.
"""

from typing import List, Optional

import gevent
import gevent.event
from redis.exceptions import NoScriptError

from .connection import Direct
from .node import REDIS_DOWN, Backoff
from .turn import Finish, Turn, add_finish


class Finisher:
    """The finishing half of `AppNode` (a mixin: it uses the node's Redis client, inbox,
    streams, processing list and logger)."""

    def _init_finisher(self) -> None:
        self._to_finish: List[tuple] = []   # (turns, event) waiting for the next write
        self._committing = False            # a worker is writing finished turns
        self.committer = Direct(self.redis)   # the group commit's round trips

    def _finish(self, done: List[Turn]) -> None:
        """Write what ``done`` left, with what other workers finish meanwhile: while one
        worker's round trip is on its way, the turns others finish wait for the next, which
        writes them all (a group commit), so round trips per message fall as load rises."""
        if not done:
            return
        written = gevent.event.Event()
        self._to_finish.append((done, written))
        if self._committing:
            written.wait()
            return
        self._committing = True
        try:
            while self._to_finish:
                group, self._to_finish = self._to_finish, []
                try:
                    self._write([turn for turns, _ in group for turn in turns])
                finally:
                    for _, event in group:
                        event.set()
        finally:
            self._committing = False

    def _write(self, done: List[Turn]) -> None:
        """One `_finish_once`, retried while Redis is unreachable: the handlers ran, so
        their commands wait here until Redis takes them."""
        backoff = Backoff()
        while True:
            try:
                self._finish_once(done, direct=True)
            except REDIS_DOWN as exc:
                self._redis_lost("finish", exc)
                gevent.sleep(backoff.next())
                continue
            except Exception as exc:
                # not Redis away: what the handlers left cannot be written; their clients
                # go back, each one's oldest message with one more attempt (so a poison
                # message ends in the dead-letter list) rather than stay held forever
                self.logger.exception("app-node %s: could not finish %d client(s); they go "
                                      "back to the inbox", self.id, len(done))
                try:
                    for lane in self.lanes:
                        lane.inbox.hand_back(lane.processing, self.id,
                                             sids=[t.sid for t in done if t.lane is lane],
                                             error=f"its finish failed: {exc!r}"[:500])
                except REDIS_DOWN:
                    pass     # released below: `_recover` gives them back once Redis is back
                for turn in done:
                    turn.finishes = []       # nothing of them was written
            self._redis_back()
            return

    def _finish_once(self, done: List[Turn], running: Optional[Turn] = None,
                     commands=(), direct: bool = False) -> None:
        """One round trip writes all ``done`` and ``running`` (the turn of a handler that
        waits, kept) left (`add_finish`), and sees whether more clients wait; ``direct``
        on the group commit's own connection."""
        turns = done if running is None else [*done, running]
        pipe = self.redis.pipeline(transaction=False)
        plan = add_finish(self, pipe, turns, running, commands)
        results = self.committer.execute(pipe) if direct else pipe.execute(raise_on_error=False)
        self._failed_writes(results[:plan.deferred])
        if any(isinstance(result, NoScriptError) for result in results[plan.deferred:]):
            # Redis lost its scripts (a restart): the commands and the finish did not go
            self.inbox.load_scripts()
            self.streams.rewrite(plan.streams)
            self._finish_unscripted(turns, running)
            return
        for result in results[plan.deferred:]:
            if isinstance(result, Exception):
                raise result
        for lane, position in plan.waiting:
            lane.more = results[position] > 0
        self.inbox.dropped(sum(results[position] for position in plan.dead_letters))
        self._written(running)

    def _failed_writes(self, results: list) -> None:
        """`App.writes` Redis refused (the app's bug) are logged; the message is finished."""
        for result in results:
            if isinstance(result, Exception):
                self.logger.error("app-node %s: a handler's app.writes() command failed: %s",
                                  self.id, result)

    def _finish_unscripted(self, turns: List[Turn], running: Optional[Turn]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for lane in self.lanes:
            lane.more = True
            mine = [turn.done(release=turn is not running) for turn in turns if turn.lane is lane]
            if mine:
                lane.inbox.finish(pipe, lane.processing, mine)
        pipe.execute()
        self._written(running)

    def _written(self, running: Optional[Turn]) -> None:
        """What the running turn did so far is written: counted, not written again."""
        if running is not None:
            self._count(running.finishes)
            running.finishes, running.retries = [], []

    def _count(self, finishes: List[Finish]) -> None:
        for finish in finishes:
            if finish.handled:
                self.handled += 1
            if finish.forget is not None:
                self.commands.forget(finish.forget.sid)

    def _settle(self, done: List[Turn]) -> None:
        """After the round trip: count what was handled, forget clients that left."""
        for turn in done:
            self._count(turn.finishes)
        self._release(turn.sid for turn in done)
