"""The app-node: runs the application's handlers on the clients taken from the inbox.

An `AppNode` runs an `App` with ``workers`` greenlets. One at a time waits on the inbox
(`Inbox.take`), taking as many clients as there are idle workers, each with its oldest
messages and its session: a **turn**. A worker handles a turn's messages one after the
other (side by side with ``App(async_handlers=True)``), and, when its handlers never
yield, the turns left in turn; then it writes all the commands and sessions they made and
finishes them in one round trip. So one client's messages are handled in the order they
arrived, one at a time across all app-nodes, and a read-modify-write of its session is
never lost. A handler that raises is logged with its envelope; its message is tried again
before the client's later ones, and after ``max_attempts`` it goes to the dead-letter list.

Run it with ``python -m siocluster.appnode package.module:app``.
"""

if __name__ == "__main__":  # an entry point: patch before anything imports socket or ssl
    from gevent import monkey

    monkey.patch_all()

import os
import time
from typing import List, Optional

import gevent
import gevent.event
import gevent.local
import gevent.lock

from .app import App
from .commands import Commands, HandlerContext, current, enter
from .envelope import Envelope
from .finisher import Finisher
from .lanes import TAKE_MORE, Taking
from .loader import as_app, load_app, wrong_server
from .node import REDIS_DOWN, Node, require_gevent_patch
from .reaper import Reaper
from .shards import Inboxes
from .streams import CommandStreams
from .tasks import check_mode, start_cluster_task
from .telemetry import AppTelemetry
from .turn import Batch, Finish, Turn


class AppNode(Finisher, Taking, AppTelemetry, Node):
    """Runs an `App` on the inbox.

    :param app: the `App` (or ``"module:attr"`` naming it; or a
        `siocluster.flask_socketio.SocketIO`, or the Flask app it was made for).
    :param config: a `Config` or a mapping of its keys; ``workers`` greenlets at once.
    :param redis: a redis-py client to use instead of one built from the config.
    :param background_tasks: ``"node"`` or ``"cluster"``: sets the app's (`App`).

    ::

        node = AppNode(app, {"REDIS_URL": url}).start()
        ...
        node.stop()          # finishes the messages in flight, takes no new ones
    """

    role = "app-node"

    def __init__(self, app, config=None, redis=None, background_tasks: Optional[str] = None):
        found = load_app(app) if isinstance(app, str) else as_app(app)
        if found is None:
            raise TypeError(f"AppNode() takes a siocluster.App, not {type(app).__name__}"
                            f"{wrong_server(app)}")
        super().__init__(config, redis)
        c = self.config
        self.app: App = found
        self.app.node = self
        if background_tasks is not None:
            self.app.background_tasks = check_mode(background_tasks)
        self.tasks = {}             # name -> the `ClusterTask` this node campaigns for
        self.inbox = Inboxes(self.redis, self.keys, c)
        self.streams = CommandStreams(self.redis, self.keys, c.stream_maxlen)
        self.commands = Commands(self.streams, self.state, self.keys, c.call_timeout,
                                 c.pop_timeout, self.id, self.logger)
        # one io-node's commands on its own stream, unless a client may move (recovery) or
        # the shards' streams keep each handler's commands in order (several shards)
        self.commands.route_by_node = not self.recovery.enabled and len(self.keys.shards) == 1
        self.reaper = Reaper(self)
        self.handled = 0
        self.init_telemetry()
        self._batches = gevent.local.local()     # .current: the worker's `Batch`
        self._init_lanes()
        self._init_finisher()

    def start(self):
        require_gevent_patch("app-node")
        self.check_redis()
        self.inbox.load_scripts()
        super().start()
        pending, self.app.pending_tasks = self.app.pending_tasks, []
        for task in pending:        # cluster tasks started before any app-node ran the app
            start_cluster_task(self, task)
        self._spawn_workers()
        self.spawn_loop(self._reap_step, "reaper")
        if self.app.admin is not None:      # app.instrument(): the Admin UI's server stats
            self.spawn_loop(self._admin_step, "admin")
        self.logger.info("app-node %s started with %d workers", self.id, self.config.workers)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Take no new messages, finish the ones in flight (at most ``timeout`` seconds),
        give back any still unfinished, and deregister."""
        self.stopping.set()
        if self._busy:
            self.logger.info("app-node %s: finishing %d client turn(s) in flight", self.id,
                             self._busy)
        self.join(timeout)
        for task in list(self.tasks.values()):
            task.join(1.0)          # each gives its lease up: a standby takes it at once
        try:
            self._give_back_ready()
            left = self._hand_back_held(f"app-node {self.id} stopped before its handler "
                                        "finished")
        except REDIS_DOWN:
            # still registered: once our heartbeat lapses the reaper hands them over
            self.logger.warning("app-node %s stopped without Redis: the reaper will hand its "
                                "unfinished messages to other app-nodes", self.id)
            return
        if left:
            self.logger.warning("app-node %s: %d handler(s) still running after %.1fs; their "
                                "clients went back to the inbox", self.id, left, timeout)
        super().stop(0.1)
        self.stop_http()

    # ---- taking clients ---------------------------------------------------------------------

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

    def _admin_step(self):
        self.app.admin.server_stats(self)
        self.stopping.wait(self.app.admin.interval)

    # ---- handling ---------------------------------------------------------------------------

    def handle_batch(self, turns: List[Turn]) -> None:
        """Run turns, one after the other; then write all they left in one round trip. A
        handler that waits (`App.flush`, `App.sleep`, `App.call`) first sends what was done
        before it, and gives the turns after it back (`flush`)."""
        batch = Batch(turns)
        self._batches.current = batch
        try:
            # stop() waits for what is in flight: what is not started yet goes back
            while not self.stopping.is_set():
                if not batch.rest:
                    # turns taken meanwhile that no idle worker takes up (all are busy): run
                    # here, written with the rest in one round trip. An idle worker gets
                    # the chance first: a slow handler of a turn run here would hold back
                    # the writes of those before it.
                    ready = batch.lane.ready
                    if batch.messages() > TAKE_MORE or not ready:
                        break
                    gevent.sleep(0)
                    if not ready:
                        break
                    batch.rest.append(ready.popleft())
                batch.current = batch.rest.pop(0)
                self._run_turn(batch.current)
                batch.done.append(batch.current)
                batch.current = None
            done = batch.take_done()
            self._finish(done)
        finally:
            self._batches.current = None
        self._settle(done)
        rest = batch.take_rest()
        if rest:
            self._give_back(rest)

    def _run_turn(self, turn: Turn) -> None:
        """Handle a turn's messages in order (side by side with ``async_handlers``); one to
        try again stops the turn: the client's later messages wait behind it."""
        if self.app.async_handlers:
            raws, turn.rest = turn.rest, []
            jobs = [gevent.spawn(self._handle_one, turn, raw) for raw in raws]
            gevent.joinall(jobs)
            for raw, job in zip(raws, jobs):
                if job.value is not None:
                    turn.finishes.append(job.value)
                elif job.exception is not None:
                    turn.rest.append(raw)     # killed: left in the queue, handled again
            return
        while turn.rest and not self.stopping.is_set():
            finish = self._handle_one(turn, turn.rest[0])
            if finish is None:
                return
            turn.rest.pop(0)
            turn.finishes.append(finish)

    def _handle_one(self, turn: Turn, raw: str) -> Optional[Finish]:
        """Run one message's handler; returns what it leaves to write, or None when it is
        to be tried again (a retry is added to the turn; a Redis outage counts none)."""
        try:
            envelope = Envelope.decode(raw)
        except Exception as exc:     # MessageError, or a field of the wrong type
            self.logger.error("app-node %s: malformed message moved to %s: %s (%.200r)",
                              self.id, turn.lane.inbox.keys.dead, exc, raw)
            return Finish(raw, dead={"error": f"malformed: {exc}", "raw": raw})
        context = HandlerContext(self, envelope, turn)
        previous, mark = enter(context), turn.mark()
        try:
            if envelope.kind == "disconnect" and envelope.conn is not None \
                    and self.redis.hget(self.keys.shard(envelope.sid).conns, envelope.sid) \
                    not in (None, envelope.conn):
                # the end of a connection its client no longer uses: it came back on another
                return Finish(raw, handled=True)
            started = time.perf_counter()
            self.app.dispatch(context)
            self.count_handled(envelope, time.perf_counter() - started)
        except REDIS_DOWN as exc:
            # not the message's fault: again later, without counting an attempt
            self._redis_lost("handler", exc)
            turn.rollback(mark)
            return None
        except Exception as exc:
            turn.rollback(mark)
            self.logger.exception("app-node %s: handler failed on %s %r of %s (attempt %d): %s",
                                  self.id, envelope.kind, envelope.event, envelope.sid,
                                  envelope.attempt + 1, envelope.encode()[:500],
                                  extra={"sid": envelope.sid, "event": envelope.event})
            # the handler's commands are dropped: a retry would send them again
            envelope.attempt += 1
            if envelope.attempt >= self.config.max_attempts:
                self.logger.error("app-node %s: message %s failed %d times, moved to %s",
                                  self.id, envelope.id, envelope.attempt,
                                  turn.lane.inbox.keys.dead)
                self.stats.dead += 1
                return Finish(raw, dead={"error": f"{exc.__class__.__name__}: {exc}",
                                         "raw": envelope.encode(),
                                         "attempts": envelope.attempt})
            self.stats.retries += 1
            turn.retries.append((raw, envelope.encode()))
            return None
        finally:
            enter(previous)
        gone = envelope.kind == "disconnect" or context.refused
        if gone:
            turn.gone = True
        return Finish(raw, context.commands, forget=envelope if gone else None, handled=True,
                      writes=context.writes)

    def flush(self) -> None:
        """Send the running handler's commands now (before a call() waits, say), with what
        its batch and turn did so far; the turns after it (and those taken and not started,
        when no worker is free) go back to the inbox rather than wait behind it."""
        batch: Optional[Batch] = getattr(self._batches, "current", None)
        if batch is not None and batch.rest:
            self._give_back(batch.take_rest())
        if batch is not None and batch.lane.busy >= batch.lane.workers:
            self._give_back_ready([batch.lane])     # no worker of its lane is free
        context = current()
        commands = context.commands if context is not None and context.node is self else []
        done = batch.take_done() if batch is not None else []
        running = batch.current if batch is not None else None
        if done or (running is not None and (running.finishes or running.retries)):
            self._finish_once(done, running, commands)
            self._settle(done)
        elif commands:
            self.streams.send(commands, running.lane.inbox.keys
                              if running is not None and running.lane else None)
        del commands[:]


def main(argv=None) -> None:
    import argparse

    from redis.exceptions import RedisError

    from . import logs
    from .config import Config
    from .connection import start_failure
    from .entry import catch_signals, listen_error

    parser = argparse.ArgumentParser(prog="python -m siocluster.appnode",
                                     description="Run an app-node: the app's handlers on the "
                                                 "cluster's inbox.")
    parser.add_argument("app", help="the App to run, as package.module:attr (an App, a "
                                    "siocluster.flask_socketio.SocketIO, or its Flask app)")
    parser.add_argument("--background-tasks", choices=("node", "cluster"), default=None,
                        help="what start_background_task does: run the task in each app-node "
                             "that calls it (node, python-socketio's way and the default), or "
                             "once per cluster, handed over if its app-node dies (cluster)")
    config, args = Config.load(argv, parser=parser, role="app-node")
    logs.setup(config, "app-node")
    try:
        node = AppNode(args.app, config, background_tasks=args.background_tasks)
        logs.identify(node.id)
        shutdown = catch_signals()      # from here on a signal stops the node gracefully
        node.start()        # checks Redis first
    except (RuntimeError, RedisError) as exc:   # Redis unreachable or refusing: says what to do
        raise SystemExit(f"app-node: {start_failure(exc, config.effective_redis_url)}")
    if args.http_port is not None or os.environ.get("SIOCLUSTER_HTTP_PORT"):
        # its own port, given: /metrics, /healthz and /readyz
        try:
            server = node.serve_http((config.http_host, config.http_port))
        except OSError as exc:
            node.stop(1.0)
            raise SystemExit(listen_error("app-node", exc, config.http_host, config.http_port))
        node.logger.info("app-node %s: metrics on http://%s:%s/metrics", node.id,
                         *server.address[:2])
    node.run_until_signalled("draining", shutdown)


if __name__ == "__main__":
    # the canonical module's main, not this __main__ copy: its classes would be strangers
    # to the ones the application imports from siocluster
    from siocluster.appnode import main as _main

    _main()
