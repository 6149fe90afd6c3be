"""The connection to Redis: which URLs can name the cluster's Redis, and the redis-py client
every node talks to it with.

    parse_redis_url("redis+sentinel://s1:26379,s2/mymaster/0")   # checks; ConfigError if bad
    client = make_redis("redis://localhost:6379/0")

`Config.redis_client()` is the usual way in; it passes the configured URL and options here.
redis-py itself is imported only when a client is made: the policy server and the
frontend's configuration never load it.
"""

from typing import Optional
from urllib.parse import unquote, urlsplit

from . import defaults
from .errors import ConfigError
from .net import port_number

REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel",
                 "redis+cluster", "rediss+cluster")


def _hosts(url: str, netloc: str, default_port: int, what: str) -> list:
    hosts = []
    for item in netloc.rpartition("@")[2].split(","):
        host, _, port = item.partition(":")
        if not host:
            raise ConfigError(f"REDIS_URL: {url!r} names no {what} host")
        hosts.append((host, port_number(port or default_port, "REDIS_URL")))
    return hosts


def _auth(parts) -> dict:
    return {"username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password else None,
            "ssl": parts.scheme.startswith("rediss")}


def parse_redis_url(url: str) -> dict:
    """Check a Redis URL and return its parts; raises `ConfigError` for a malformed one."""
    try:
        parts = urlsplit(url)
        if "+" not in parts.scheme:
            parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise ConfigError(f"REDIS_URL: {url!r} is malformed ({exc})")
    if parts.scheme not in REDIS_SCHEMES:
        raise ConfigError(f"REDIS_URL: {url!r} has scheme {parts.scheme!r}; "
                          f"use one of {', '.join(s + '://' for s in REDIS_SCHEMES)}")
    if parts.scheme.endswith("cluster"):
        if parts.path.strip("/") not in ("", "0"):
            raise ConfigError(f"REDIS_URL: {url!r} names database {parts.path.strip('/')!r}; "
                              "Redis Cluster has database 0 only")
        return {"seeds": _hosts(url, parts.netloc, 6379, "cluster"), **_auth(parts)}
    if parts.scheme.endswith("sentinel"):
        hosts = _hosts(url, parts.netloc, 26379, "sentinel")
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ConfigError(f"REDIS_URL: {url!r} needs the sentinel service name: "
                              "redis+sentinel://host:26379/mymaster/0")
        db = path[1] if len(path) > 1 else "0"
        if not db.isdigit():
            raise ConfigError(f"REDIS_URL: database {db!r} in {url!r} is not a number")
        return {"sentinels": hosts, "service": path[0], "db": int(db), **_auth(parts)}
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"REDIS_URL: {url!r} names no host")
    db = parts.path.strip("/")
    if parts.scheme != "unix" and db and not db.isdigit():
        raise ConfigError(f"REDIS_URL: database {db!r} in {url!r} is not a number")
    return {"scheme": parts.scheme}


def is_cluster(client) -> bool:
    """Whether a redis-py client talks to a Redis Cluster."""
    return hasattr(client, "nodes_manager")


def make_redis(url: str, options: Optional[dict] = None):
    """A redis-py client with timeouts fit for blocking pops and health checks; on a Redis
    Cluster (``redis+cluster://``), a `slots.ClusterClient`."""
    import redis
    from redis.sentinel import Sentinel

    opts = {
        "decode_responses": True,
        "socket_timeout": defaults.REDIS_SOCKET_TIMEOUT,
        "socket_connect_timeout": defaults.REDIS_CONNECT_TIMEOUT,
        "socket_keepalive": True,
        "health_check_interval": defaults.REDIS_HEALTH_CHECK_INTERVAL,
        # bytes that are not UTF-8 (garbage anyone pushed) read back as they are and match
        # themselves when written back, so a reader skips them instead of failing on them
        "encoding_errors": "surrogateescape",
    }
    opts.update(options or {})
    parts = parse_redis_url(url)
    if urlsplit(url).scheme == "unix":
        opts.pop("socket_keepalive", None)      # not a TCP connection: redis-py refuses it
    if "seeds" in parts:
        from .slots import make_cluster_client

        auth = {k: parts[k] for k in ("username", "password") if parts[k]}
        return make_cluster_client(parts["seeds"], {**opts, **auth, "ssl": parts["ssl"]})
    if "sentinels" in parts:
        auth = {k: parts[k] for k in ("username", "password") if parts[k]}
        sentinel = Sentinel(parts["sentinels"], sentinel_kwargs=dict(auth),
                            ssl=parts["ssl"], **opts)
        return sentinel.master_for(parts["service"], db=parts["db"], **auth)
    return redis.Redis.from_url(url, **opts)


def refuse_cluster_node(client, url: str) -> None:
    """A RuntimeError naming REDIS_URL when a one-Redis URL names a node of a Redis Cluster
    (its commands would be refused with MOVED or CROSSSLOT, or land on one master); nothing
    when it cannot tell (INFO not allowed, Redis away: the node's own check says so)."""
    from redis.exceptions import RedisError

    if is_cluster(client):
        return
    try:
        enabled = str(client.info("cluster").get("cluster_enabled", "0")) == "1"
    except (RedisError, OSError):
        return
    if enabled:
        scheme, _, rest = url.partition("://")
        raise RuntimeError(f"REDIS_URL: the Redis at {scheme}://{rest.rpartition('@')[2]} is a "
                           "node of a Redis Cluster: name the cluster's nodes with "
                           "redis+cluster://host:port[,host:port...] (rediss+cluster:// for TLS)")


def start_failure(exc: Exception, url: str) -> str:
    """What a node says when Redis fails its start: a RuntimeError's own words (they say
    what to do already); a Redis error, with REDIS_URL (no secrets) and what to do."""
    from redis import exceptions as errors

    from .slots import ClusterUnavailable

    if isinstance(exc, RuntimeError):
        return str(exc)
    scheme, _, rest = url.partition("://")
    shown = f"{scheme}://{rest.rpartition('@')[2]}"
    if isinstance(exc, (errors.MovedError, errors.AskError, errors.ClusterCrossSlotError)):
        return (f"REDIS_URL: the Redis at {shown} is a node of a Redis Cluster "
                f"({exc.__class__.__name__}: {exc}): name the cluster's nodes with "
                "redis+cluster://host:port[,host:port...] (rediss+cluster:// for TLS)")
    if isinstance(exc, (errors.ClusterDownError, errors.TryAgainError, ClusterUnavailable)):
        return (f"REDIS_URL: the Redis Cluster at {shown} does not serve every slot ({exc}): "
                "a master is down without a replica to take over. Check it with redis-cli "
                "--cluster check host:port, then start the node again")
    if "+cluster" in scheme and isinstance(exc, errors.ConnectionError):
        return (f"REDIS_URL: a master of the Redis Cluster at {shown} cannot be reached "
                f"({exc}): is it down without a replica to take over? Check the cluster with "
                "redis-cli --cluster check host:port, then start the node again")
    return f"REDIS_URL: Redis at {shown} failed the start: {exc.__class__.__name__}: {exc}"


def pack(commands: list) -> list:
    """Commands in the Redis protocol, as `send_packed_command` takes them, each packed by
    hiredis's C code: redis-py's own packing wraps that in more Python than the round trip."""
    import hiredis

    packed = []
    for args in commands:
        if isinstance(args[0], str) and " " in args[0]:       # "SCRIPT LOAD", ...
            args = (*args[0].split(), *args[1:])
        try:
            packed.append(hiredis.pack_command(tuple(args)))
        except TypeError:
            try:
                packed.append(hiredis.pack_command(tuple(
                    bytes(arg) if isinstance(arg, bytearray) else arg for arg in args)))
            except TypeError as exc:
                from redis.exceptions import DataError

                raise DataError(exc) from None     # as redis-py's own packing says it
    return [b"".join(packed)]


class Direct:
    """Round trips on a connection of its own, for one loop's hot path: the commands of a
    redis-py pipeline, or one command, packed and sent in one write and their replies
    read raw (no response callbacks), an error reply returned in its place. It skips what
    redis-py does around each round trip (pool checkout, the readiness poll, retries,
    pipeline bookkeeping), which costs more CPU than the round trip itself. One greenlet
    at a time uses it; a connection error closes it (the next call reconnects) and is
    raised as redis-py raises it::

        direct = Direct(client)
        pipe = client.pipeline(transaction=False)    # only to build the commands
        pipe.evalsha(sha, 1, key, arg)
        replies = direct.execute(pipe)
    """

    def __init__(self, client):
        import gevent.lock

        # on a Redis Cluster: a connection of its own to each master it sends to
        self._router = client.router if is_cluster(client) else None
        self._conns = {}
        self._pool = None if self._router else client.connection_pool
        self._conn = None
        self._loaded = set()        # shas of the pipelines' scripts known loaded
        self._lock = gevent.lock.Semaphore()    # one round trip on the connection at a time

    def call(self, *args):
        """One command's raw reply (an error reply raised)."""
        reply = self._run([args])[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    def execute(self, pipe) -> list:
        """Run the commands of ``pipe`` (a redis-py pipeline, used only to build them;
        in MULTI/EXEC when it is transactional); their raw replies, errors in place."""
        from redis.exceptions import NoScriptError

        if self._router is not None:
            self._router.load(pipe.scripts)
            with self._lock:
                replies = self._router.run(pipe.command_stack, transaction=pipe.transaction,
                                           conns=self._conns)
            if any(isinstance(reply, NoScriptError) for reply in replies):
                self._router.loaded.clear()
            return replies
        for script in pipe.scripts:
            if script.sha not in self._loaded:
                self.call("SCRIPT", "LOAD", script.script)
                self._loaded.add(script.sha)
        commands = [args for args, _ in pipe.command_stack]
        if not pipe.transaction:
            replies = self._run(commands)
        else:
            replies = self._run([("MULTI",), *commands, ("EXEC",)])
            replies = replies[-1] if isinstance(replies[-1], list) else replies[1:-1]
        if any(isinstance(reply, NoScriptError) for reply in replies):
            self._loaded.clear()    # Redis lost its scripts: load them again next time
        return replies

    def _run(self, commands: list) -> list:

        with self._lock:
            if self._router is not None:
                return self._router.run([(args, {}) for args in commands], conns=self._conns)
            return self._run_locked(commands)

    def _run_locked(self, commands: list) -> list:
        from redis.exceptions import ResponseError

        conn = self._conn
        if conn is None:
            # checked out for good: the pool still closes it with the client (close())
            conn = self._conn = self._pool.get_connection()
        try:
            conn.send_packed_command(pack(commands))
            replies = []
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
            return replies
        except BaseException:
            # a reply may be half read: the connection cannot be trusted any more
            conn.disconnect()
            raise
