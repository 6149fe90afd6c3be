"""`siocluster`: the operators' command (also `python -m siocluster`), docs/operations.md:
``status [--json]``, ``dead list [--limit N]``, ``dead show INDEX|ID``, ``dead requeue
INDEX|ID|--all``, ``dead purge [--yes]``.

Configured as every node is (``SIOCLUSTER_<KEY>`` variables, then ``--redis-url`` and
``--prefix``). It reads with SCAN, never KEYS, every loop bounded. A requeue pushes through
the inbox's own script (`Inbox.push`), so the inbox's counters and the client's ready token
stay right, and removes the record only once the push succeeded. Exit codes: 0 ok, 1
error, 2 usage.
"""

import argparse
import json
import os
import sys
import time
from typing import List, Optional, Tuple
from urllib.parse import urlsplit

from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .config import Config
from .envelope import Envelope, MessageError
from .errors import ConfigError
from .inbox import Inbox
from .state import Keys

PROG = "siocluster"
SCAN_COUNT = 1000             # keys one SCAN round trip looks at
SCAN_ROUND_TRIPS = 1000       # rooms are counted over at most this many SCAN round trips
CHUNK = 100                   # dead-letter records read per round trip
PERSISTENCE_OFF = ("Redis has persistence off: a restart loses every message and client; "
                   "the guarantees in the README need appendonly yes")
NO_SPACE = "the inbox refused it for space"


class CliError(Exception):
    """What went wrong, in one line; ``code`` is the exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class Cluster:
    """What a command works on: the config, a Redis client and the cluster's keys."""

    def __init__(self, config: Config, redis):
        self.config, self.redis, self.keys = config, redis, Keys(config.prefix)


# ---- status -------------------------------------------------------------------------------

def _object(raw) -> dict:
    """A JSON object as stored, or {} for anything else."""
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _ago(now: float, then) -> Optional[float]:
    try:
        return round(now - float(then), 1)
    except (TypeError, ValueError):
        return None


def collect_status(cluster: Cluster, now: Optional[float] = None) -> dict:
    """All that `siocluster status` shows, as one JSON-safe dict (docs/operations.md lists
    its fields)."""
    redis, keys = cluster.redis, cluster.keys
    now = time.time() if now is None else now
    infos = {node: _object(raw) for node, raw in redis.hgetall(keys.nodes).items()}
    ids = sorted(infos, key=lambda n: (str(infos[n].get("role")), n))
    pipe = redis.pipeline(transaction=False)
    for node in ids:
        pipe.get(keys.alive(node))        # its value: the time of its last heartbeat
        if infos[node].get("role") == "app-node":
            pipe.llen(keys.processing(node))
        else:
            pipe.xlen(keys.node_commands(node))
    for command, key in (("hlen", keys.clients), ("zcard", keys.parked), ("llen", keys.ready),
                         ("llen", keys.dead), ("xlen", keys.commands)):
        getattr(pipe, command)(key)
    pipe.hmget(keys.inbox_size, "messages", "bytes")
    replies = pipe.execute()
    nodes, processing, node_streams = [], {}, {}
    for at, node in enumerate(ids):
        info, beat, length = infos[node], replies[2 * at], replies[2 * at + 1]
        kind = str(info.get("role") or "unknown")
        entry = {"id": node, "kind": kind, "alive": beat is not None, "host": info.get("host"),
                 "started_at": info.get("started_at"), "age": _ago(now, info.get("started_at")),
                 "last_heartbeat": _ago(now, beat)}
        if kind == "app-node":
            entry["processing"] = processing[node] = length
        else:
            node_streams[node] = length
        if kind == "io-node":
            entry["address"] = {k: info.get(k) for k in ("internal", "external", "port", "tls")}
            entry.update(clients=info.get("clients"), polling_clients=info.get("polling_clients"))
        nodes.append(entry)
    clients, parked, ready, dead, commands, (messages, size) = replies[2 * len(ids):]
    rooms, complete = count_rooms(redis, keys)
    status = {
        "prefix": keys.prefix, "checked_at": round(now, 3),
        "redis": {"url": shown_url(cluster.config.effective_redis_url), **redis_facts(redis)},
        "nodes": nodes, "clients": clients, "parked": parked,
        "rooms": {"count": rooms, "complete": complete},
        "inbox": {"messages": int(messages or 0), "bytes": int(size or 0), "ready": ready,
                  "processing": processing},
        "dead_letters": dead, "streams": {"commands": commands, "nodes": node_streams}}
    status["warnings"] = warnings(status, keys)
    return status


def count_rooms(redis, keys: Keys) -> Tuple[int, bool]:
    """Room keys of the cluster (SCAN), and whether the count is complete: it stops after
    `SCAN_ROUND_TRIPS` round trips, each looking at about `SCAN_COUNT` keys."""
    pattern = "".join("\\" + c if c in "*?[]\\" else c for c in keys.room_prefix) + "*"
    cursor, count = 0, 0
    for _ in range(SCAN_ROUND_TRIPS):
        cursor, found = redis.scan(cursor, match=pattern, count=SCAN_COUNT)
        count += len(found)
        if int(cursor) == 0:
            return count, True
    return count, False


def redis_facts(redis) -> dict:
    """Redis's version, and its ``appendonly`` and ``save`` settings, or why they could not
    be read (hosted Redis often refuses CONFIG, an ACL may refuse INFO)."""
    facts: dict = {"version": None}
    try:
        facts["version"] = redis.info("server").get("redis_version")
    except ResponseError:
        pass
    try:
        facts["persistence"] = {"checked": True,
                                "appendonly": redis.config_get("appendonly").get("appendonly"),
                                "save": redis.config_get("save").get("save")}
    except ResponseError as exc:
        facts["persistence"] = {"checked": False, "error": one_line(exc)}
    return facts


def warnings(status: dict, keys: Keys) -> List[str]:
    out, persistence, nodes = [], status["redis"]["persistence"], status["nodes"]
    if not persistence["checked"]:
        out.append(f"could not check Redis persistence (CONFIG GET: {persistence['error']}): "
                   "make sure it runs with appendonly yes")
    elif persistence["appendonly"] == "no" and not persistence["save"]:
        out.append(PERSISTENCE_OFF)
    elif persistence["appendonly"] == "no":
        out.append(f"Redis persists only by snapshots (save \"{persistence['save']}\"): a "
                   "restart loses what came after the last one; the guarantees in the README "
                   "need appendonly yes")
    if not nodes:
        out.append(f"no node is registered under prefix {keys.prefix!r}: is the prefix "
                   "right (--prefix, SIOCLUSTER_PREFIX)?")
    elif not any(n["alive"] and n["kind"] == "app-node" for n in nodes):
        out.append("no app-node is alive: client messages wait in the inbox, and no reaper "
                   "cleans up after dead nodes")
    out += [f"{n['kind']} {n['id']} is dead (its heartbeat lapsed) but still registered: a "
            "live app-node's reaper cleans it up within NODE_TTL + 2 heartbeat intervals"
            for n in nodes if not n["alive"]]
    if status["dead_letters"]:
        out.append(f"{status['dead_letters']} message(s) in the dead-letter list {keys.dead}: "
                   "see `siocluster dead list`")
    return out


def cmd_status(cluster: Cluster, args) -> int:
    status = collect_status(cluster)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    redis, nodes, inbox = status["redis"], status["nodes"], status["inbox"]
    print(f"cluster          {status['prefix']} on {redis['url']}"
          + (f" (Redis {redis['version']})" if redis["version"] else ""))
    print(f"nodes            {len(nodes)} ({sum(n['alive'] for n in nodes)} alive)")
    rows = [["KIND", "ID", "STATE", "UP", "ADDRESS", "INTERNAL", "LOAD"]]
    for node in nodes:
        address, internal, load = "", "", ""
        if node["kind"] == "io-node":
            a = node["address"]
            address = f"{'https' if a.get('tls') else 'http'}://{a.get('external')}:{a.get('port')}"
            internal, load = str(a.get("internal") or ""), f"{node['clients']} clients"
        elif node["kind"] == "app-node":
            load = f"holding {node['processing']} clients"
        rows.append([node["kind"], node["id"], "alive" if node["alive"] else "DEAD",
                     duration(node["age"]), address, internal, load])
    if nodes:
        print("\n".join(table(rows)))
    print(f"clients          {status['clients']} ({status['parked']} of them parked, may "
          "come back within RECOVERY_WINDOW)")
    print(f"rooms            {status['rooms']['count']}"
          + ("" if status["rooms"]["complete"] else " at least (counting stopped)"))
    held = ", ".join(f"{node} {n}" for node, n in inbox["processing"].items()) or "none"
    print(f"inbox            {inbox['messages']} messages ({inbox['bytes']:,} bytes), "
          f"{inbox['ready']} clients ready; clients held by app-nodes: {held}")
    print(f"dead letters     {status['dead_letters']}")
    print(f"command streams  shared {status['streams']['commands']} entries"
          + "".join(f"; {node} {n}" for node, n in status["streams"]["nodes"].items()))
    print("warnings" + ("" if status["warnings"] else "         none"))
    for warning in status["warnings"]:
        print(f"  ! {warning}")
    return 0


# ---- dead letters ---------------------------------------------------------------------------

def find(cluster: Cluster, which: str) -> Tuple[int, str]:
    """A dead letter by its index (0 the newest) or its message's id."""
    redis, dead = cluster.redis, cluster.keys.dead
    if which.isdigit():
        value = redis.lindex(dead, int(which))
        if value is None:
            raise CliError(f"no dead letter at index {which}: {dead} holds {redis.llen(dead)}")
        return int(which), value
    length = redis.llen(dead)
    for start in range(0, length, CHUNK):
        for index, value in enumerate(redis.lrange(dead, start, start + CHUNK - 1), start):
            if _object(_object(value).get("raw")).get("id") == which:
                return index, value
    raise CliError(f"no dead letter at index or with message id {which!r}")


def oldest_first(cluster: Cluster) -> List[str]:
    """The dead letters, the oldest first, read in chunks from the tail (indexes from the
    tail do not move as new dead letters come in at the head)."""
    redis, dead, values = cluster.redis, cluster.keys.dead, []
    for start in range(0, redis.llen(dead), CHUNK):
        values += reversed(redis.lrange(dead, -(start + CHUNK), -start - 1))
    return values


def cmd_dead_list(cluster: Cluster, args) -> int:
    redis, dead = cluster.redis, cluster.keys.dead
    length = redis.llen(dead)
    values = redis.lrange(dead, 0, max(1, args.limit) - 1) if length else []
    print(f"{dead}: {length} dead letters" + (", newest first" if length else "")
          + (f" (the newest {len(values)}; --limit N for more)" if len(values) < length else ""))
    rows = [["INDEX", "TIME (UTC)", "APP-NODE", "ATTEMPTS", "MESSAGE", "SID", "ERROR"]]
    for index, value in enumerate(values):
        record = _object(value)
        envelope = _object(record.get("raw"))     # {} when cut, malformed or missing
        attempts = record.get("attempts", envelope.get("attempt"))
        message = str(envelope.get("kind") or "(unreadable)")
        if envelope.get("event") is not None:
            message += f" {str(envelope['event'])[:40]!r}"
        rows.append([str(index), timestamp(record.get("ts")), str(record.get("app_node") or ""),
                     "" if attempts is None else str(attempts),
                     message + (" (cut)" if record.get("cut") else ""),
                     str(envelope.get("sid") or ""),
                     one_line(record.get("error") or "" if record else value)[:80]])
    if values:
        print("\n".join(table(rows)))
    return 0


def cmd_dead_show(cluster: Cluster, args) -> int:
    value = find(cluster, args.which)[1]
    if args.envelope:
        value = _object(value).get("raw") or ""
    print(json.dumps(_object(value), indent=2, ensure_ascii=False) if _object(value) else value)
    return 0


def requeue(cluster: Cluster, inbox: Inbox, value: str) -> str:
    """Push a dead letter's message back to the end of its client's queue, then remove the
    record; returns what was done, or raises `CliError` saying why it cannot be."""
    record = _object(value)
    if record.get("cut"):
        raise CliError(f"its message was cut short to DEAD_RECORD_SIZE (it had "
                       f"{record.get('raw_bytes')} bytes): it cannot be requeued")
    raw = record.get("raw")
    if not isinstance(raw, str) or not raw:
        raise CliError("the record holds no message: nothing to requeue")
    try:
        envelope = Envelope.decode(raw)
    except (MessageError, ValueError, TypeError, KeyError) as exc:
        raise CliError(f"its message is malformed ({exc}): an app-node would dead-letter it "
                       "again")
    if inbox.push([(envelope.kind, envelope.sid, raw)]):
        raise CliError(f"{NO_SPACE} (INBOX_MAXLEN, INBOX_MAX_BYTES or the client's "
                       "CLIENT_QUEUE_MAXLEN): try again once the backlog is handled")
    what = " ".join(filter(None, (envelope.kind, envelope.event and repr(envelope.event))))
    what += f" of {envelope.sid} (message {envelope.id}, attempt {envelope.attempt})"
    if not cluster.redis.lrem(cluster.keys.dead, 1, value):
        what += "; its record was already gone from the list (requeued or purged meanwhile?)"
    if not cluster.redis.hexists(cluster.keys.clients, envelope.sid):
        what += f"; note: client {envelope.sid} is no longer connected"
    return what


def cmd_dead_requeue(cluster: Cluster, args) -> int:
    inbox = Inbox(cluster.redis, cluster.keys, cluster.config)
    if not args.all:
        index, value = find(cluster, args.which)
        print(f"requeued [{index}] {requeue(cluster, inbox, value)}")
        return 0
    done, left = 0, 0
    for value in oldest_first(cluster):
        try:
            print(f"requeued {requeue(cluster, inbox, value)}")
            done += 1
        except CliError as exc:
            if str(exc).startswith(NO_SPACE):
                raise CliError(f"stopped after {done} requeued: {exc}")
            record = _object(value)
            print(f"left the record of {timestamp(record.get('ts'))} "
                  f"({one_line(record.get('error') or '')[:60]}): {exc}", file=sys.stderr)
            left += 1
    print(f"{done} requeued, {left} left in {cluster.keys.dead}")
    return 0


def cmd_dead_purge(cluster: Cluster, args) -> int:
    redis, dead = cluster.redis, cluster.keys.dead
    count = redis.llen(dead)
    if not count:
        print(f"{dead} is empty: nothing to delete")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise CliError(f"not deleting the {count} dead letters of {dead} without "
                           "confirmation: there is no terminal to ask on; run with --yes", 2)
        try:
            answer = input(f"delete all {count} dead letters of {dead}? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            raise CliError("nothing deleted")
    pipe = redis.pipeline(transaction=True)
    pipe.llen(dead)
    pipe.delete(dead)
    print(f"deleted {pipe.execute()[0]} dead letters from {dead}")
    return 0


# ---- plumbing --------------------------------------------------------------------------------

def one_line(text) -> str:
    return " ".join(str(text).split())


def shown_url(url: str) -> str:
    """A Redis URL without its credentials."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def duration(seconds) -> str:
    s = max(0, int(seconds or 0))
    for unit, size, sub, subsize in (("d", 86400, "h", 3600), ("h", 3600, "m", 60),
                                     ("m", 60, "s", 1)):
        if s >= size:
            return f"{s // size}{unit}{(s % size) // subsize:02d}{sub}"
    return f"{s}s" if seconds is not None else "?"


def timestamp(ts) -> str:
    """A record's time, in UTC."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if isinstance(ts, (int, float)) \
        else "?"


def table(rows: List[List[str]]) -> List[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("cluster (also every SIOCLUSTER_<KEY> variable)")
    group.add_argument("--redis-url", default=argparse.SUPPRESS,
                       help="Redis URL (SIOCLUSTER_REDIS_URL; default redis://localhost:6379/0)")
    group.add_argument("--prefix", default=argparse.SUPPRESS,
                       help="prefix of the cluster's keys (SIOCLUSTER_PREFIX; default siocluster)")
    parser = argparse.ArgumentParser(prog=PROG, parents=[common], description="Look at a "
                                     "siocluster cluster through its Redis; handle its dead "
                                     "letters.")

    def command(parent, name, run, help):
        sub = parent.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(run=run)
        return sub

    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    status = command(commands, "status", cmd_status, "nodes, clients, rooms, inbox, dead "
                     "letters, command streams and warnings")
    status.add_argument("--json", action="store_true", help="one JSON object, for machines")
    dead = commands.add_parser("dead", parents=[common], help="the dead-letter list")
    actions = dead.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = command(actions, "list", cmd_dead_list, "the records, the newest first")
    listing.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    show = command(actions, "show", cmd_dead_show, "one record, as pretty JSON")
    show.add_argument("which", metavar="INDEX|ID", help="its index in `dead list` (0 the "
                      "newest), or its message's id")
    show.add_argument("--envelope", action="store_true", help="only its message, decoded")
    again = command(actions, "requeue", cmd_dead_requeue, "a record's message back to the "
                    "end of its client's queue, its attempt count kept")
    which = again.add_mutually_exclusive_group(required=True)
    which.add_argument("which", metavar="INDEX|ID", nargs="?", help="its index or message id")
    which.add_argument("--all", action="store_true", help="every record, the oldest first")
    purge = command(actions, "purge", cmd_dead_purge, "delete the whole dead-letter list")
    purge.add_argument("--yes", "-y", action="store_true", help="do not ask first")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command; returns its exit code (the console script exits with it)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:       # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        config = Config.from_env(os.environ)
        given = {k: getattr(args, k) for k in ("redis_url", "prefix") if hasattr(args, k)}
        config = config.replace(**given) if given else config
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    shown = shown_url(config.effective_redis_url)
    redis = config.redis_client()
    code = 1
    try:
        return args.run(Cluster(config, redis), args)
    except CliError as exc:
        code, message = exc.code, str(exc)
    except AuthenticationError as exc:
        message = (f"Redis at {shown} refused the user or password ({one_line(exc)}): check "
                   "REDIS_URL (redis://user:password@host:port/db)")
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        message = (f"cannot reach Redis at {shown}: {one_line(exc).rstrip('.')}. Is it "
                   "running? Set SIOCLUSTER_REDIS_URL or --redis-url to where it runs.")
    except RedisError as exc:
        message = f"Redis at {shown} answered with an error: {one_line(exc)}"
    except KeyboardInterrupt:
        return 130
    finally:
        redis.close()
    print(f"{PROG}: {message}", file=sys.stderr)
    return code
