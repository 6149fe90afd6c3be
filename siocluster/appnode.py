"""The app-node: runs the application's handlers on messages taken from the inbox.

An `AppNode` runs an `App` with ``workers`` greenlets. One at a time waits on the inbox
(`Inbox.take`), taking as many messages as there are idle workers. Each message taken goes
to a free worker; a worker whose handlers never yield handles the ones left in turn, then
writes all the commands they made and finishes them in one round trip, while handlers
that wait run side by side. Each message goes to exactly one app-node. A handler that
raises is logged with its envelope; the message is tried again (its own commands dropped,
the other messages of its batch unaffected), and after ``max_attempts`` it goes to the
dead-letter list.

Run it with ``python -m siocluster.appnode package.module:app``.
"""

if __name__ == "__main__":  # an entry point: patch before anything imports socket or ssl
    from gevent import monkey

    monkey.patch_all()

import collections
import logging
import time
from typing import Dict, List, Optional

import gevent
import gevent.local
import gevent.lock
from redis.exceptions import NoScriptError

from .app import App, load_app
from .commands import Commands, HandlerContext, current, enter
from .envelope import Envelope
from .inbox import Inbox
from .node import REDIS_DOWN, Backoff, Node, require_gevent_patch
from .reaper import Reaper
from .streams import CommandStreams

# Messages a worker takes at once when more wait, besides one: one round trip to take them
# and one to write all their commands halves the app-node's CPU per message under load,
# while a batch stays short enough (a few ms of handlers) not to delay its first acks.
TAKE_MORE = 15


class Finish:
    """What a handled message leaves to write: its handler's commands, a client to forget,
    a retry or a dead-letter record; then it leaves the processing list."""

    __slots__ = ("raw", "commands", "dead", "retry", "forget", "handled")

    def __init__(self, raw: str, commands=(), dead: Optional[dict] = None,
                 retry: Optional[Envelope] = None, forget: Optional[Envelope] = None,
                 handled: bool = False):
        self.raw, self.commands, self.dead, self.retry = raw, commands, dead, retry
        self.forget, self.handled = forget, handled


class Batch:
    """The messages one worker handles in a row: those ``done``, whose writes wait for
    one round trip, and the ``rest``, not started yet. A handler that waits takes both."""

    __slots__ = ("done", "rest")

    def __init__(self, raws: List[str]):
        self.done: List[Finish] = []
        self.rest = list(raws)

    def take_done(self) -> List[Finish]:
        done, self.done = self.done, []
        return done

    def take_rest(self) -> List[str]:
        rest, self.rest = self.rest, []
        return rest


class AppNode(Node):
    """Runs an `App` on the inbox.

    :param app: the `App` (or ``"module:attr"`` naming it).
    :param config: a `Config` or a mapping of its keys; ``workers`` greenlets at once.
    :param redis: a redis-py client to use instead of one built from the config.

    ::

        node = AppNode(app, {"REDIS_URL": url}).start()
        ...
        node.stop()          # finishes the messages in flight, takes no new ones
    """

    role = "app-node"

    def __init__(self, app, config=None, redis=None):
        super().__init__(config, redis)
        c = self.config
        self.app: App = load_app(app) if isinstance(app, str) else app
        self.app.node = self
        self.processing = self.keys.processing(self.id)
        self.inbox = Inbox(self.redis, self.keys, c)
        self.streams = CommandStreams(self.redis, self.keys, c.stream_maxlen)
        self.commands = Commands(self.streams, self.state, self.keys, c.call_timeout,
                                 c.pop_timeout, self.id, self.logger)
        self.reaper = Reaper(self)
        self.handled = 0
        self._batches = gevent.local.local()     # .current: the worker's `Batch`
        self._taking = gevent.lock.Semaphore()   # one worker waits on the inbox at a time
        self._more = False       # the last round trip saw messages waiting in the inbox
        self._ready = collections.deque()   # taken, not started: for the next free worker
        self._busy = 0           # workers running handlers
        self._inflight: Dict[str, int] = {}   # raw envelopes the workers hold right now
        # after a Redis blip: None, True (look at the processing list), or the set of
        # messages no worker held at the first look (moved back if still unheld at the next)
        self._recover_due = None

    def start(self):
        require_gevent_patch("app-node")
        self.check_redis()
        super().start()
        for n in range(self.config.workers):
            self.spawn_loop(self._work_step, f"worker-{n}")
        self.spawn_loop(self._reap_step, "reaper")
        self.logger.info("app-node %s started with %d workers", self.id, self.config.workers)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Take no new messages, finish the ones in flight (at most ``timeout`` seconds),
        give back any still unfinished, and deregister."""
        self.stopping.set()
        if self._busy:
            self.logger.info("app-node %s: finishing %d message(s) in flight", self.id,
                             self._busy)
        self.join(timeout)
        try:
            self._give_back_ready()
            # what is left in our processing list: its handler was killed
            left = self.inbox.held(self.processing)
            self.inbox.hand_back(self.processing, self.id, raws=left,
                                 error=f"app-node {self.id} stopped before its handler finished")
        except REDIS_DOWN:
            # still registered: once our heartbeat lapses the reaper hands them over
            self.logger.warning("app-node %s stopped without Redis: the reaper will hand its "
                                "unfinished messages to other app-nodes", self.id)
            return
        if left:
            self.logger.warning("app-node %s: %d handler(s) still running after %.1fs; their "
                                "messages went back to the inbox", self.id, len(left), timeout)
        super().stop(0.1)

    # ---- taking messages --------------------------------------------------------------------

    def _work_step(self):
        first = self._next_message()
        if first is None:
            return
        self._busy += 1
        try:
            self.handle_batch([first])
        finally:
            self._busy -= 1

    def _next_message(self) -> Optional[str]:
        """The next message for this worker: one taken already and not started, else
        the first of a take (the rest wait in `_ready` for this and idle workers)."""
        while not self._ready:
            with self._taking:
                if self._ready:
                    break        # another worker's take while this one waited its turn
                if self.stopping.is_set():
                    return None
                raws = self._take()
                if not raws:
                    return None
                # registered before anything can yield, so `_recover` never takes them
                for raw in raws:
                    self._inflight[raw] = self._inflight.get(raw, 0) + 1
                if self.stopping.is_set():
                    # taken while stop() waited: not ours to start any more
                    self._give_back(raws)
                    return None
                self._ready.extend(raws[1:])
                return raws[0]
        return self._ready.popleft()

    def _take(self) -> List[str]:
        """Take as many messages as there are idle workers (all of `TAKE_MORE` + 1 while a
        backlog waits) in one round trip. One worker at a time waits on the inbox, so
        messages that arrive together are taken together (with many workers each blocked on
        ``BLMOVE``, Redis would hand a burst out one message per worker)."""
        if self._more:
            raws, self._more = self.inbox.take_waiting(self.processing, TAKE_MORE + 1)
            self._redis_back()
            if raws:
                return raws
        wanted = min(TAKE_MORE + 1, self.config.workers - self._busy)
        raws, self._more = self.inbox.take(self.processing, wanted, self.config.pop_timeout)
        self._redis_back()
        return raws

    def _give_back(self, raws: List[str]) -> None:
        try:
            self.inbox.give_back(self.processing, raws, self.id)
        finally:
            # given back or not (Redis away), no worker holds them now: if they are still in
            # the processing list when Redis returns, `_recover` gives them back
            self._release(raws)

    def _give_back_ready(self) -> None:
        """Messages taken and not started by any worker go back to the inbox."""
        if self._ready:
            unstarted, self._ready = list(self._ready), collections.deque()
            self._give_back(unstarted)

    def _release(self, raws) -> None:
        """Messages finished or given back are no longer held by this process."""
        for raw in raws:
            count = self._inflight.get(raw, 0)
            if count > 1:
                self._inflight[raw] = count - 1
            else:
                self._inflight.pop(raw, None)

    def _reap_step(self):
        period = self.config.heartbeat_interval / 2
        started = time.monotonic()
        self.stopping.wait(period)
        if self.stopping.is_set():
            return
        if time.monotonic() - started > period + self.config.heartbeat_interval:
            # this process stalled (CPU starved, a long synchronous call): nodes living in
            # it could not heartbeat either, so give them a round before judging anyone
            return
        self._recover()
        self.reaper.step()

    def redis_returned(self) -> None:
        self._recover_due = True

    def _recover(self) -> None:
        """After a Redis blip, give back the messages of our processing list that no worker
        holds: a take whose reply was lost with the connection never reached a worker."""
        if self._recover_due is None:
            return
        unheld = {raw for raw in self.inbox.held(self.processing) if raw not in self._inflight}
        if self._recover_due is True:
            # a take's reply may be on its way to a worker right now: look again next round
            self._recover_due = unheld or None
            return
        orphans, self._recover_due = unheld & self._recover_due, None
        self.inbox.give_back(self.processing, list(orphans), self.id)
        if orphans:
            self.logger.warning("app-node %s: %d message(s) taken while Redis went away went "
                                "back to the inbox", self.id, len(orphans))

    # ---- handling ---------------------------------------------------------------------------

    def handle_batch(self, raws: List[str]) -> None:
        """Handle raw envelopes taken into the processing list, oldest first, one after
        the other; then write all they left behind in one round trip. A handler that waits
        (`App.flush`, `App.sleep`, `App.call`) first sends what the messages before it left
        and gives the ones after it back to the inbox, so none wait on it (`flush`)."""
        batch = Batch(raws)
        self._batches.current = batch
        try:
            # stop() waits for what is in flight: what is not started yet goes back
            while not self.stopping.is_set():
                if not batch.rest:
                    # messages taken meanwhile that no idle worker took up (handlers that
                    # never yield leave them all to this one): handled here, written with
                    # the rest in one round trip
                    if len(batch.done) > TAKE_MORE or not self._ready:
                        break
                    batch.rest.append(self._ready.popleft())
                finish = self._handle_one(batch.rest.pop(0))
                # after the handler: one that waited had `flush` take what was done before
                batch.done.append(finish)
            done = batch.take_done()
            self._finish(done)
        finally:
            self._batches.current = None
        self._settle(done)
        rest = batch.take_rest()
        if rest:
            self._give_back(rest)

    def _handle_one(self, raw: str) -> Finish:
        """Run one message's handler; returns what it leaves to write."""
        try:
            envelope = Envelope.decode(raw)
        except Exception as exc:     # MessageError, or a field of the wrong type
            self.logger.error("app-node %s: malformed message moved to %s: %s (%.200r)",
                              self.id, self.keys.dead, exc, raw)
            return Finish(raw, dead={"error": f"malformed: {exc}", "raw": raw})
        context = HandlerContext(self, envelope)
        previous = enter(context)
        try:
            self.app.dispatch(context)
        except REDIS_DOWN as exc:
            # not the message's fault: again later, without counting an attempt
            self._redis_lost("handler", exc)
            return Finish(raw, retry=envelope)
        except Exception as exc:
            self.logger.exception("app-node %s: handler failed on %s %r of %s (attempt %d): %s",
                                  self.id, envelope.kind, envelope.event, envelope.sid,
                                  envelope.attempt + 1, envelope.encode()[:500])
            # the handler's commands are dropped: a retry would send them again
            envelope.attempt += 1
            if envelope.attempt >= self.config.max_attempts:
                self.logger.error("app-node %s: message %s failed %d times, moved to %s",
                                  self.id, envelope.id, envelope.attempt, self.keys.dead)
                return Finish(raw, dead={"error": f"{exc.__class__.__name__}: {exc}",
                                         "raw": envelope.encode()})
            return Finish(raw, retry=envelope)
        finally:
            enter(previous)
        gone = envelope.kind == "disconnect" or context.refused
        return Finish(raw, context.commands, forget=envelope if gone else None, handled=True)

    def _finish(self, done: List[Finish]) -> None:
        """Write what handled messages left behind, retrying while Redis is unreachable:
        the handlers ran, so their commands wait here until Redis takes them."""
        if not done:
            return
        backoff = Backoff()
        while True:
            try:
                self._finish_once(done)
            except REDIS_DOWN as exc:
                self._redis_lost("finish", exc)
                gevent.sleep(backoff.next())
                continue
            self._redis_back()
            return

    def _finish_once(self, done: List[Finish], commands=()) -> None:
        """One round trip: the handlers' commands (then ``commands``, the running
        handler's), the state of clients that left, the messages off the processing list,
        and whether more messages wait."""
        pipe = self.redis.pipeline(transaction=False)
        writes = self.streams.write(pipe, [f.commands for f in done] + [commands])
        dead_letters = []
        for finish in done:
            if finish.forget is not None:
                # only now: the disconnect handler could still read the client's rooms and
                # session
                forget = finish.forget
                self.state.forget_client(forget.sid, forget.namespace, forget.node, pipe=pipe)
            if finish.dead is not None:
                dead_letters.append(
                    self.inbox.dead_letter(pipe, {**finish.dead, "app_node": self.id}))
            if finish.retry is not None:
                self.inbox.retry(pipe, finish.retry)
            self.inbox.finish(pipe, self.processing, finish.raw)
        self.inbox.waiting(pipe)
        try:
            results = pipe.execute()
        except NoScriptError:
            # Redis lost its scripts (a restart): all went through but the commands
            self.streams.rewrite(writes)
            self._more = True
            return
        self._more = results[-1] > 0
        self.inbox.dropped(sum(results[position] for position in dead_letters))

    def _settle(self, done: List[Finish]) -> None:
        """After the round trip: count what was handled, forget clients that left."""
        for finish in done:
            if finish.handled:
                self.handled += 1
            if finish.forget is not None:
                self.commands.forget(finish.forget.sid)
        self._release(finish.raw for finish in done)

    def flush(self) -> None:
        """Send the running handler's commands now (before a call() waits, say), with what
        the messages handled before it in its batch left; the messages after it go back to
        the inbox for other workers, rather than wait behind a handler that waits (so do
        the ones taken and not started, when no other worker is free to start them)."""
        batch: Optional[Batch] = getattr(self._batches, "current", None)
        if batch is not None and batch.rest:
            self._give_back(batch.take_rest())
        if self._busy >= self.config.workers:
            self._give_back_ready()
        context = current()
        commands = context.commands if context is not None and context.node is self else []
        done = batch.take_done() if batch is not None else []
        if done:
            self._finish_once(done, commands)
            self._settle(done)
        elif commands:
            self.streams.send(commands)
        del commands[:]


def main(argv=None) -> None:
    import argparse

    from .config import Config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m siocluster.appnode",
                                     description="Run an app-node: the app's handlers on the "
                                                 "cluster's inbox.")
    parser.add_argument("app", help="the App to run, as package.module:attr")
    config, args = Config.load(argv, parser=parser)
    node = AppNode(args.app, config)
    try:
        node.start()
    except RuntimeError as exc:      # Redis unreachable, a wrong password: already says what to do
        raise SystemExit(f"app-node: {exc}")
    node.run_until_signalled("draining")


if __name__ == "__main__":
    # the canonical module's main, not this __main__ copy: its classes would be strangers
    # to the ones the application imports from siocluster
    from siocluster.appnode import main as _main

    _main()
