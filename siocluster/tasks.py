"""Background tasks that run once per cluster: a lease in Redis decides which app-node runs it.

python-socketio's ``start_background_task`` runs a task in the process that calls it. On
a cluster that is once per app-node: the usual ``if thread is None:`` guard in a handler
starts one in every app-node that handles a client, and each client gets every event of
the task once per app-node. A `ClusterTask` runs it once for the whole cluster::

    app.start_cluster_task(ticker)

or, for every ``start_background_task`` of an app, ``App(background_tasks="cluster")`` or
``python -m siocluster.appnode module:app --background-tasks cluster``.

Every app-node that starts the task (by name: the target's module and qualified name,
unless given) campaigns for its lease, the key ``<prefix>:task:<name>``, with ``SET NX
PX``. The one that gets it runs the target and renews the lease every
``HEARTBEAT_INTERVAL``; the others stand by and try again at the same pace. When the
holder dies, its lease lapses after at most ``NODE_TTL`` and a standby takes it at its
next try: the task starts again, from the beginning, on another app-node within ``NODE_TTL
+ HEARTBEAT_INTERVAL`` (12 s with the defaults). An app-node that stops gracefully gives
the lease up at once. When the target returns (or raises), the holder marks the task done
for ``NODE_TTL``, and the app-nodes standing by for it stand down: it ran once.

A holder that stalls for longer than ``NODE_TTL`` (or cannot reach Redis for that long)
may find its lease taken by another: it stops its target as soon as it learns so, at its
next renewal. For that moment two may run: keep what the task writes idempotent.
"""

import time
from typing import Callable, Optional

import gevent
import gevent.event
from redis.exceptions import WatchError

from .envelope import new_id
from .node import REDIS_DOWN

DONE = "done"
MODES = ("node", "cluster")


def check_mode(mode: str) -> str:
    """``background_tasks``: ``"node"`` or ``"cluster"``, or a ValueError that says so."""
    if mode not in MODES:
        raise ValueError(f"background_tasks: {mode!r} is not 'node' (each app-node runs its "
                         "own, as python-socketio does) or 'cluster' (once per cluster)")
    return mode


def task_name(target: Callable) -> str:
    """The default name of a task: its target's module and qualified name."""
    module = getattr(target, "__module__", None) or "?"
    return f"{module}.{getattr(target, '__qualname__', None) or repr(target)}"


class ClusterTask:
    """One cluster-wide task, as one app-node sees it: campaigning for the lease, running
    the target while it holds it. `join` waits until it ended here (it finished, here or
    on another app-node, or this app-node stopped); `kill` ends it here (the lease goes)."""

    def __init__(self, name: str, target: Callable, args: tuple, kwargs: dict):
        self.name, self.target, self.args, self.kwargs = name, target, args, kwargs
        self.node = None            # the app-node campaigning for it, once `start`ed
        self.greenlet: Optional[gevent.Greenlet] = None   # the target, while we hold the lease
        self.renewed_at = 0.0
        self.ended = gevent.event.Event()
        self._wake = gevent.event.Event()
        self._finished = False      # the target returned or raised here
        self._killed = False

    def start(self, node) -> "ClusterTask":
        """Campaign for the lease through app-node ``node``."""
        self.node = node
        self.key = f"{node.keys.prefix}:task:{self.name}"
        self.token = f"{node.id}:{new_id()}"
        self.ttl_ms = max(1, int(node.config.node_ttl * 1000))
        self.interval = node.config.heartbeat_interval
        gevent.spawn(self._campaign)
        return self

    # ---- what callers see --------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether this app-node runs the target right now."""
        return self.greenlet is not None and not self.greenlet.dead

    def join(self, timeout: Optional[float] = None) -> bool:
        return self.ended.wait(timeout)

    def kill(self) -> None:
        self._killed = True
        self._wake.set()
        if self.node is not None:
            self.ended.wait(5)

    # ---- the campaign ------------------------------------------------------------------------

    def _campaign(self) -> None:
        logger, warned = self.node.logger, False
        try:
            while not (self.node.stopping.is_set() or self._killed):
                try:
                    if self._step():
                        return
                    warned = False
                except REDIS_DOWN as exc:
                    if not warned:
                        logger.warning("task %s: Redis is unreachable (%s); trying again",
                                       self.name, exc.__class__.__name__)
                        warned = True
                    if self.running and time.monotonic() - self.renewed_at > \
                            self.node.config.node_ttl:
                        # the lease may have lapsed and gone to another app-node: stop ours
                        logger.warning("task %s: its lease could not be renewed for %.1fs; "
                                       "stopped here", self.name, self.node.config.node_ttl)
                        self.greenlet.kill()
                except Exception:
                    logger.exception("task %s: unexpected error in its lease loop", self.name)
                self._wake.clear()
                gevent.wait([self.node.stopping, self._wake], timeout=self.interval, count=1)
        finally:
            self._give_up()
            self.ended.set()

    def _step(self) -> bool:
        """One round: renew or campaign. True when the task has ended for this node."""
        if self.greenlet is not None:
            if self.greenlet.dead:
                self._mark(DONE if self._finished else None)
                self.greenlet = None
                return self._finished
            if not self._renew():
                self.greenlet.kill()
                self.greenlet = None
                self.node.logger.warning("task %s: its lease went to another app-node (this "
                                         "one stalled); stopped here", self.name)
            return False
        pipe = self.node.redis.pipeline(transaction=False)
        pipe.set(self.key, self.token, nx=True, px=self.ttl_ms)
        pipe.get(self.key)
        won, holder = pipe.execute()
        if won:
            self.renewed_at = time.monotonic()
            self.greenlet = gevent.spawn(self._run)
            self.node.logger.info("task %s runs on %s (its lease: %s)", self.name,
                                  self.node.id, self.key)
            return False
        return holder == DONE      # it ran to its end elsewhere: stand down

    def _run(self) -> None:
        try:
            self.target(*self.args, **self.kwargs)
        except gevent.GreenletExit:
            raise
        except Exception:
            self.node.logger.exception("task %s raised; it is not run again", self.name)
        self._finished = True
        self._wake.set()

    def _renew(self) -> bool:
        ok = self._if_mine(lambda pipe: pipe.pexpire(self.key, self.ttl_ms))
        if ok:
            self.renewed_at = time.monotonic()
        return ok

    def _mark(self, value: Optional[str]) -> None:
        """Done (the value `DONE` for NODE_TTL: standbys stand down), or given up (None)."""
        if value is None:
            self._if_mine(lambda pipe: pipe.delete(self.key))
        else:
            self._if_mine(lambda pipe: pipe.set(self.key, value, px=self.ttl_ms))

    def _if_mine(self, write) -> bool:
        """Run ``write`` on the lease in a transaction, only while this node holds it."""
        with self.node.redis.pipeline() as pipe:
            try:
                pipe.watch(self.key)
                if pipe.get(self.key) != self.token:
                    pipe.unwatch()
                    return False
                pipe.multi()
                write(pipe)
                pipe.execute()
                return True
            except WatchError:
                return False

    def _give_up(self) -> None:
        """This node stops (or the task was killed): stop the target, let the lease go."""
        greenlet, self.greenlet = self.greenlet, None
        if greenlet is not None:
            finished = self._finished
            greenlet.kill()
            try:
                self._mark(DONE if finished else None)
            except REDIS_DOWN:
                pass       # it lapses by itself within NODE_TTL


def start_cluster_task(node, task: ClusterTask) -> ClusterTask:
    """Start ``task`` through app-node ``node``, unless the node already campaigns for a
    task of that name (``node.tasks``, its registry): then that one is returned."""
    running = node.tasks.get(task.name)
    if running is not None and not running.ended.is_set():
        return running
    node.tasks[task.name] = task
    return task.start(node)
