"""A client's turn on an app-node: its messages taken together, handled in order.

An app-node takes a client from the inbox with its oldest messages and its session (a
`Turn`); a worker runs its messages' handlers, each leaving a `Finish` to write, and runs
turns in a row (a `Batch`) when its handlers never yield, to write what they all left in
one round trip.
"""

from typing import List, NamedTuple, Optional

from .envelope import Envelope, dumps, parse
from .inbox import Done, Taken


class Finish:
    """What a handled message leaves to write: its handler's commands, a client to
    forget, a dead-letter record; then it leaves its queue."""

    __slots__ = ("raw", "commands", "dead", "forget", "handled", "writes")

    def __init__(self, raw: str, commands=(), dead: Optional[dict] = None,
                 forget: Optional[Envelope] = None, handled: bool = False, writes=None):
        self.raw, self.commands, self.dead = raw, commands, dead
        self.forget, self.handled, self.writes = forget, handled, writes


class Turn:
    """A client taken from the inbox: its messages not handled yet (``rest``, oldest
    first), those handled and not yet written (``finishes``), retries to write, and its
    session, read with the take and written when the turn is finished if it changed."""

    __slots__ = ("sid", "rest", "finishes", "retries", "gone", "lane", "_stored", "_session")

    def __init__(self, taken: Taken, lane=None):
        self.sid, self.rest, self._stored = taken.sid, list(taken.raws), taken.session
        self.lane = lane                    # the `lanes.Lane` (shard) it was taken from
        self.finishes: List[Finish] = []
        self.retries: List[tuple] = []      # (message as taken, its next attempt)
        self.gone = False                   # its client left: its session goes with it
        self._session = None

    def session(self) -> dict:
        """The client's session: the handlers of its turn share one dict."""
        if self._session is None:
            self._session = parse(self._stored) if self._stored else {}
        return self._session

    def save_session(self, session: dict) -> None:
        self._session = session

    def mark(self) -> Optional[str]:
        """The session as it is before a handler runs, for `rollback`."""
        return None if self._session is None else dumps(self._session)

    def rollback(self, mark: Optional[str]) -> None:
        """A handler raised: its changes to the session are dropped with its commands."""
        self._session = None if mark is None else parse(mark)

    def changed_session(self) -> Optional[str]:
        """The session to write, when a handler changed it (JSON), else None."""
        if self._session is None or self.gone:
            return None
        raw = dumps(self._session)
        if raw == self._stored:
            return None
        self._stored = raw
        return raw

    def done(self, release: bool) -> Done:
        return Done(self.sid, [f.raw for f in self.finishes], self.retries, release)


class Batch:
    """The turns one worker runs in a row: those ``done``, whose writes wait for one round
    trip, the ``current`` one, and the ``rest``, not started yet."""

    __slots__ = ("done", "current", "rest", "lane")

    def __init__(self, turns: List[Turn]):
        self.lane = turns[0].lane           # a worker's turns are of its lane
        self.done: List[Turn] = []
        self.current: Optional[Turn] = None
        self.rest = list(turns)

    def take_done(self) -> List[Turn]:
        done, self.done = self.done, []
        return done

    def take_rest(self) -> List[Turn]:
        rest, self.rest = self.rest, []
        return rest

    def messages(self) -> int:
        return sum(len(turn.finishes) for turn in self.done)


class FinishPlan(NamedTuple):
    """Where `add_finish` put things in its pipeline."""

    deferred: int            # replies before this are the sessions' and `App.writes`'
    streams: list            # the stream entries written (for `CommandStreams.rewrite`)
    dead_letters: List[int]  # replies: how many old dead letters each one dropped
    waiting: list            # (lane, reply): how many clients wait in its ready list


def add_finish(node, pipe, turns: List[Turn], running: Optional[Turn], commands) -> FinishPlan:
    """Add to ``pipe`` all that app-node ``node`` writes to finish ``turns``: the sessions
    their handlers changed and their `App.writes`, then their commands (then ``commands``,
    the running handler's), the state of clients that left, dead letters, and the handled
    messages off their queues, the turns released but ``running`` (the turn of a handler
    that waits)."""
    for turn in turns:
        session = turn.changed_session()
        if session is not None:
            pipe.set(turn.lane.inbox.keys.session(turn.sid), session)
    # each handler's commands, with the shard of its client (whose stream they go to)
    batches = [(f, turn.lane.inbox.keys) for turn in turns for f in turn.finishes]
    for finish, _ in batches:
        if finish.writes is not None:
            finish.writes.replay(pipe)
    deferred = len(pipe)
    streams = node.streams.write(pipe, [f.commands for f, _ in batches] + [commands],
                                 [shard for _, shard in batches]
                                 + [running.lane.inbox.keys if running else None])
    dead_letters = []
    for turn in turns:
        for finish in turn.finishes:
            if finish.forget is not None:
                # only now: the disconnect handler could still read its rooms and session
                forget = finish.forget
                node.state.forget_client(forget.sid, forget.namespace, forget.node, pipe=pipe)
            if finish.dead is not None:
                dead_letters.append(turn.lane.inbox.dead_letter(
                    pipe, {**finish.dead, "app_node": node.id}))
    waiting = []
    for lane in node.lanes:
        mine = [turn.done(release=turn is not running) for turn in turns if turn.lane is lane]
        if mine:
            waiting.append((lane, lane.inbox.finish(pipe, lane.processing, mine)))
    return FinishPlan(deferred, streams, dead_letters, waiting)
