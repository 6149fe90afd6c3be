"""What every siocluster process shares: its Redis client, a heartbeat, and stoppable loops.

A node's work is a few loops, each a greenlet running ``while not stopping: step()``.
A step that raises is logged and the loop goes on; when Redis is unreachable the loop
backs off (doubling up to a cap, reset after a success) and the node says so once, not
once per message; a step that got an answer from Redis calls `_redis_back()`, which says
once that Redis is back and calls `redis_returned()`, for subclasses to catch up.
`stop()` sets the flag and `join()` waits, so tests start and stop real nodes in-process.
"""

import gc
import logging
import os
import socket
import time

import gevent
import gevent.event
from gevent import monkey
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import defaults, observe
from .config import Config, as_config
from .connection import refuse_cluster_node
from .recovery import Recovery
from .state import ClusterState

# what a node's loops take for "Redis is unreachable": back off and try again
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)


def require_gevent_patch(role: str) -> None:
    """Fail loudly when the process runs unpatched blocking sockets under gevent."""
    if not monkey.is_module_patched("socket"):
        raise RuntimeError(
            f"siocluster's {role} needs gevent to monkey-patch the standard library first: "
            "call `from gevent import monkey; monkey.patch_all()` at the very top of your "
            f"entry point, or run it with `python -m siocluster.{role.replace('-', '')}`.")


class Backoff:
    """Doubling delay up to a cap; `reset()` after a success."""

    def __init__(self, start=defaults.RECONNECT_BACKOFF_START, cap=defaults.RECONNECT_BACKOFF_MAX):
        self.start, self.cap = start, cap
        self.delay = start

    def next(self) -> float:
        delay = self.delay
        self.delay = min(self.delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        self.delay = self.start


class Node:
    """Base of io-nodes and app-nodes.

    :param config: a `Config` or a mapping of its keys.
    :param redis: a redis-py client to use instead of one built from the config.
    """

    role = "node"

    def __init__(self, config=None, redis=None):
        self.config: Config = as_config(config)
        self.id = self.config.make_node_id(self.role)
        self.logger = logging.getLogger(f"siocluster.{self.role}")
        self.redis = redis if redis is not None else self.config.redis_client()
        self.keys = self.config.keys()
        self.state = ClusterState(self.redis, self.keys)
        self.recovery = Recovery(self.redis, self.keys, self.config)
        self.stopping = gevent.event.Event()
        self._greenlets = []
        self._redis_down_since = None
        self.started_at = time.time()
        # when this node's Redis connection last came back (0: it never broke)
        self.redis_up_since = 0.0
        self.draining = False
        self.redis_roundtrip = observe.Histogram()     # of heartbeats: one script call each
        self.observer = observe.Observer(self)

    # ---- lifecycle ------------------------------------------------------------------------

    def check_redis(self) -> None:
        """Ping Redis once at start, so a wrong URL or password fails here, clearly."""
        from urllib.parse import urlsplit

        from redis.exceptions import AuthenticationError, ResponseError

        url = self.config.effective_redis_url
        parts = urlsplit(url)
        shown = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"  # no secrets
        try:
            self.redis.ping()
        except (AuthenticationError, ResponseError) as exc:
            if isinstance(exc, ResponseError) and not any(
                    word in str(exc) for word in ("NOAUTH", "WRONGPASS")):
                raise
            try:
                given = urlsplit(url).password
            except ValueError:
                given = None
            if not (given or self.config.redis_options.get("password")):
                raise RuntimeError(
                    f"Redis at {shown} needs a password ({exc}). Put it in REDIS_URL: "
                    "redis://:password@host:port/db, or redis://user:password@host:port/db "
                    "for an ACL user (or set REDIS_PASSWORD).")
            raise RuntimeError(f"Redis at {shown} refused the user or password ({exc}). Check "
                               "the ones in REDIS_URL (redis://user:password@host:port/db) or "
                               "REDIS_PASSWORD.")
        except REDIS_DOWN as exc:
            raise RuntimeError(f"cannot reach Redis at {shown}: {exc}. Start redis-server, "
                               "or set SIOCLUSTER_REDIS_URL / --redis-url to where it runs.")
        refuse_cluster_node(self.redis, url)
        self.check_layout()

    def check_layout(self) -> None:
        """The shards this node lays keys out in must be the cluster's: the first node to
        start records them, every later one checks."""
        count = len(self.keys.shards)
        self.redis.set(self.keys.layout, count, nx=True)
        stored = self.redis.get(self.keys.layout)
        if stored != str(count):
            raise RuntimeError(
                f"SHARDS: this {self.role} lays the keys of prefix {self.config.prefix!r} out "
                f"in {count} shard(s), but the cluster's are in {stored}: every node of one "
                "cluster needs the same SHARDS setting and the same kind of Redis (one "
                "Redis or Redis Cluster)")

    def start(self):
        """Start the node's loops in greenlets; returns self."""
        self.stopping.clear()
        self.heartbeat()
        self.spawn_loop(self._heartbeat_step, "heartbeat")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every loop and wait for them (at most ``timeout`` seconds)."""
        self.stopping.set()
        self.join(timeout)
        try:
            self.state.remove_node(self.id)
        except REDIS_DOWN:
            self.logger.warning("could not deregister %s: Redis is unreachable", self.id)

    def run_until_signalled(self, doing: str = "stopping", shutdown=None) -> None:
        """For entry points: `freeze_startup_objects()`, block until SIGTERM or SIGINT, then
        `stop()` gracefully. ``shutdown``: the event of `entry.catch_signals()`, called
        before `start()` so that no signal kills the node once it is registered; without
        it the signals are caught here, before the freeze (a signal during it is kept)."""
        from .entry import catch_signals, wait_for_signal

        if shutdown is None:
            shutdown = catch_signals()
        self.freeze_startup_objects()
        wait_for_signal(shutdown)
        self.logger.info("%s %s %s", self.role, self.id, doing)
        self.stop()

    def freeze_startup_objects(self) -> int:
        """Put what the process made while starting (modules, the app, its handlers) out of
        the garbage collector's reach; returns how many objects that is. For entry points,
        once, after `start()` and before serving (`run_until_signalled` does it).

        A full collection walks every tracked object, and young objects reach the oldest
        generation all the time (a message's dicts outlive a young collection while they
        wait for Redis), so without this an app-node under load stopped to walk its startup
        objects every half minute or so, about 100 ms each time, holding every message it
        had. The cost is bounded: a frozen object that later becomes garbage in a reference
        cycle (a startup connection replaced after a Redis outage) is never collected, and
        there is only ever one startup's worth of them."""
        gc.collect()
        gc.freeze()
        frozen = gc.get_freeze_count()
        self.logger.debug("%s %s: %d startup objects frozen", self.role, self.id, frozen)
        return frozen

    def join(self, timeout=None) -> None:
        gevent.joinall(self._greenlets, timeout=timeout)
        gevent.killall([g for g in self._greenlets if not g.dead], timeout=1)

    def spawn(self, func, *args):
        greenlet = gevent.spawn(func, *args)
        self._greenlets.append(greenlet)
        return greenlet

    def spawn_loop(self, step, name: str):
        """Run ``step()`` until stopped; errors are logged, Redis outages backed off."""
        return self.spawn(self._loop, step, name)

    def _loop(self, step, name):
        backoff = Backoff()
        while not self.stopping.is_set():
            try:
                step()
            except REDIS_DOWN as exc:
                self._redis_lost(name, exc)
                self.stopping.wait(backoff.next())
                continue
            except Exception:
                self.logger.exception("%s %s: unexpected error in the %s loop",
                                      self.role, self.id, name)
                self.stopping.wait(backoff.next())
                continue
            backoff.reset()

    def _redis_lost(self, name, exc) -> None:
        if self._redis_down_since is None:
            self._redis_down_since = time.time()
            self.logger.warning("%s %s lost Redis (%s in %s loop): retrying with backoff",
                                self.role, self.id, exc.__class__.__name__, name)

    def _redis_back(self) -> None:
        if self._redis_down_since is not None:
            self.logger.warning("%s %s: Redis is back after %.1fs", self.role, self.id,
                                time.time() - self._redis_down_since)
            self._redis_down_since = None
            self.redis_up_since = time.time()
            self.redis_returned()

    def redis_returned(self) -> None:
        """Called once when Redis answers again after an outage; subclasses catch up."""

    # ---- heartbeat --------------------------------------------------------------------------

    def info(self) -> dict:
        """What the registry shows of this node; subclasses add to it."""
        return {"id": self.id, "role": self.role, "host": socket.gethostname(),
                "pid": os.getpid(), "started_at": self.started_at}

    def heartbeat(self) -> None:
        """Mark this node alive for ``node_ttl`` seconds in the registry."""
        reaped, seconds = observe.timed(
            lambda: self.state.heartbeat(self.id, self.info(), self.config.node_ttl))
        self.redis_roundtrip.observe(seconds)
        if reaped:
            self.reaped()

    # ---- what operators see ---------------------------------------------------------------

    def metrics(self):
        """This node's Prometheus metric families (`siocluster.observe`); subclasses add."""
        import siocluster

        yield observe.gauge("siocluster_node_info", "this node: version, kind, id", 1,
                            version=siocluster.__version__, kind=self.role, id=self.id)
        yield observe.gauge("siocluster_redis_up", "1 while this node reaches Redis",
                            0 if self._redis_down_since is not None else 1)
        yield observe.histograms("siocluster_redis_roundtrip_seconds",
                                 "Redis round trips (each heartbeat's)", None,
                                 {"": self.redis_roundtrip})

    def readiness(self) -> dict:
        """``{check: (ok, detail)}`` for ``/readyz``; subclasses add theirs."""
        checks = {"draining": (not (self.draining or self.stopping.is_set()),
                               "stopping" if self.draining or self.stopping.is_set() else "no")}
        try:
            with gevent.Timeout(1.0):
                pipe = self.redis.pipeline(transaction=False)
                pipe.ping()
                pipe.exists(self.keys.alive(self.id))
                _, alive = pipe.execute()
            checks["redis"] = (True, "reachable")
            checks["registered"] = (bool(alive), "alive in the registry" if alive
                                    else "not registered, or its heartbeat lapsed")
        except (gevent.Timeout, *REDIS_DOWN) as exc:
            checks["redis"] = (False, f"unreachable: {exc.__class__.__name__}")
            checks["registered"] = (False, "unknown: Redis is unreachable")
        return checks

    def reaped(self) -> None:
        """Called when this node comes back after the cluster took it for dead and cleaned
        up after it (a pause or a network partition longer than ``node_ttl``)."""
        self.logger.error("%s %s was taken for dead (no heartbeat for %.0fs) and cleaned up "
                          "after; it is registered again", self.role, self.id,
                          self.config.node_ttl)

    def _heartbeat_step(self):
        self.heartbeat()
        self._redis_back()
        self.stopping.wait(self.config.heartbeat_interval)
