"""`siocluster`: the operators' command (also `python -m siocluster`), docs/operations.md:
``status [--json]``, ``dead list [--limit N]``, ``dead show INDEX|ID``, ``dead requeue
INDEX|ID|--all``, ``dead purge [--yes]`` (the dead-letter part: `siocluster.deadletters`).

Configured as every node is (``SIOCLUSTER_<KEY>`` variables, then ``--redis-url`` and
``--prefix``). It works over every shard of the cluster's keys (`Config.keys`), and on a
Redis Cluster over every master. It reads with SCAN, never KEYS, every loop bounded. A
requeue pushes through the inbox's own script (`Inbox.push`, of the client's shard), so the
inbox's counters and the client's ready token stay right, and removes the record only once
the push succeeded. Exit codes: 0 ok, 1 error, 2 usage.
"""

import argparse
import json
import os
import sys
import time
from os.path import commonprefix
from typing import Dict, List, Optional, Tuple
from urllib.parse import urlsplit

from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .config import Config
from .deadletters import (
    CliError,
    cmd_dead_list,
    cmd_dead_purge,
    cmd_dead_requeue,
    cmd_dead_show,
    dead_lists,
    json_object,
    one_line,
    table,
)
from .errors import ConfigError
from .state import Keys

PROG = "siocluster"
SCAN_COUNT = 1000             # keys one SCAN round trip looks at
SCAN_ROUND_TRIPS = 1000       # rooms are counted over at most this many SCAN round trips a Redis
PERSISTENCE_OFF = ("Redis has persistence off: a restart loses every message and client; "
                   "the guarantees in the README need appendonly yes")

__all__ = ["CliError", "PERSISTENCE_OFF", "main"]


class Cluster:
    """What a command works on: the config, a Redis client and the cluster's keys (every
    shard's). Their shard count is the one the cluster's nodes recorded (``<prefix>:layout``)
    when ``SHARDS`` is not set here; when it is set and differs, that is an error."""

    def __init__(self, config: Config, redis):
        self.config, self.redis, self.keys = config, redis, config.keys()
        stored = redis.get(self.keys.layout)
        if stored and stored.isdigit() and int(stored) != len(self.keys.shards):
            if config.shards:
                raise CliError(f"SHARDS is {config.shards} here, but the nodes of prefix "
                               f"{config.prefix!r} lay their keys out in {stored} shard(s): "
                               f"set SHARDS={stored}, or leave it unset")
            self.keys = Keys(config.prefix, int(stored), self.keys.cluster)


# ---- status -------------------------------------------------------------------------------

def _ago(now: float, then) -> Optional[float]:
    try:
        return round(now - float(then), 1)
    except (TypeError, ValueError):
        return None


def masters(redis) -> list:
    """The Redis servers holding the cluster's keys: one, or every master of a Redis
    Cluster (`ClusterNode` s), as plain clients with their names."""
    if not isinstance(redis, RedisCluster):
        return [(None, redis)]
    return [(node.name, node.redis_connection) for node in redis.get_primaries()]


def shard_masters(redis, keys: Keys) -> Optional[Dict[str, List[int]]]:
    """On a Redis Cluster: each master (host:port) -> the shards it holds, by the client's
    slot map; None on one Redis."""
    if not isinstance(redis, RedisCluster):
        return None
    held: Dict[str, List[int]] = {name: [] for name, _ in masters(redis)}
    for shard in keys.shards:
        node = redis.nodes_manager.get_node_from_slot(key_slot(shard.ready.encode()))
        held.setdefault(node.name, []).append(shard.index)
    return dict(sorted(held.items(), key=lambda item: (item[1][:1] or [len(keys.shards)],
                                                       item[0])))


def collect_status(cluster: Cluster, now: Optional[float] = None) -> dict:
    """All that `siocluster status` shows, as one JSON-safe dict (docs/operations.md lists
    its fields): counts summed over every shard."""
    redis, keys = cluster.redis, cluster.keys
    shards = keys.shards
    now = time.time() if now is None else now
    infos = {node: json_object(raw) for node, raw in redis.hgetall(keys.nodes).items()}
    ids = sorted(infos, key=lambda n: (str(infos[n].get("role")), n))
    pipe = redis.pipeline(transaction=False)
    for node in ids:
        pipe.get(keys.alive(node))        # its value: the time of its last heartbeat
        if infos[node].get("role") == "app-node":
            for shard in shards:
                pipe.llen(shard.processing(node))
        else:
            pipe.xlen(keys.node_commands(node))
    for shard in shards:
        for command, key in (("hlen", shard.clients), ("zcard", shard.parked),
                             ("llen", shard.ready), ("llen", shard.dead),
                             ("xlen", shard.commands)):
            getattr(pipe, command)(key)
        pipe.hmget(shard.inbox_size, "messages", "bytes")
    replies = iter(pipe.execute())
    nodes, processing, node_streams = [], {}, {}
    for node in ids:
        info, beat = infos[node], next(replies)
        kind = str(info.get("role") or "unknown")
        entry = {"id": node, "kind": kind, "alive": beat is not None, "host": info.get("host"),
                 "started_at": info.get("started_at"), "age": _ago(now, info.get("started_at")),
                 "last_heartbeat": _ago(now, beat)}
        if info.get("role") == "app-node":
            entry["processing"] = processing[node] = sum(next(replies) for _ in shards)
        else:
            node_streams[node] = next(replies)
        if kind == "io-node":
            entry["address"] = {k: info.get(k) for k in ("internal", "external", "port", "tls")}
            entry.update(clients=info.get("clients"), polling_clients=info.get("polling_clients"))
        nodes.append(entry)
    totals = [0] * 7    # clients, parked, ready, dead, commands, messages, bytes
    for _ in shards:
        counts = [next(replies) for _ in range(5)] + list(next(replies))
        totals = [total + int(n or 0) for total, n in zip(totals, counts)]
    clients, parked, ready, dead, commands, messages, size = totals
    rooms, complete = count_rooms(redis, keys)
    status = {
        "prefix": keys.prefix, "checked_at": round(now, 3),
        "redis": {"url": shown_url(cluster.config.effective_redis_url), **redis_facts(redis)},
        "shards": {"count": len(shards), "masters": shard_masters(redis, keys)},
        "nodes": nodes, "clients": clients, "parked": parked,
        "rooms": {"count": rooms, "complete": complete},
        "inbox": {"messages": messages, "bytes": size, "ready": ready,
                  "processing": processing},
        "dead_letters": dead, "streams": {"commands": commands, "nodes": node_streams}}
    status["warnings"] = warnings(status, keys)
    return status


def count_rooms(redis, keys: Keys) -> Tuple[int, bool]:
    """Room keys of every shard (SCAN, on every master of a Redis Cluster), and whether the
    count is complete: it stops after `SCAN_ROUND_TRIPS` round trips a Redis, each looking at
    about `SCAN_COUNT` keys."""
    prefixes = [shard.room_prefix for shard in keys.shards]
    head = commonprefix(prefixes)
    tail = commonprefix([p[len(head):][::-1] for p in prefixes])[::-1]

    def glob(text):
        return "".join("\\" + c if c in "*?[]\\" else c for c in text)

    pattern = glob(head) + ("*" + glob(tail) if len(prefixes) > 1 else "") + "*"
    count, complete = 0, True
    for _, server in masters(redis):
        cursor = 0
        for _ in range(SCAN_ROUND_TRIPS):
            cursor, found = server.scan(cursor, match=pattern, count=SCAN_COUNT)
            count += sum(key.startswith(tuple(prefixes)) for key in found)
            if int(cursor) == 0:
                break
        else:
            complete = False
    return count, complete


def redis_facts(redis) -> dict:
    """Redis's version, and its ``appendonly`` and ``save`` settings, or why they could not
    be read (hosted Redis often refuses CONFIG, an ACL may refuse INFO). On a Redis Cluster,
    those of its least durable masters, named in ``masters``."""
    facts: dict = {"version": None}
    found: list = []    # (rank, persistence, master) of each Redis; rank 0 the least durable
    for name, server in masters(redis):
        try:
            facts["version"] = facts["version"] or server.info("server").get("redis_version")
        except ResponseError:
            pass
        try:
            persistence = {"checked": True,
                           "appendonly": server.config_get("appendonly").get("appendonly"),
                           "save": server.config_get("save").get("save")}
            rank = 3 if persistence["appendonly"] != "no" else 2 if persistence["save"] else 0
        except ResponseError as exc:
            persistence, rank = {"checked": False, "error": one_line(exc)}, 1
        found.append((rank, persistence, name))
    least = min(rank for rank, _, _ in found)
    facts["persistence"] = next(p for rank, p, _ in found if rank == least)
    if isinstance(redis, RedisCluster):
        facts["persistence"] = {**facts["persistence"], "masters": sorted(
            name for rank, _, name in found if rank == least)}
    return facts

def warnings(status: dict, keys: Keys) -> List[str]:
    out, persistence, nodes = [], status["redis"]["persistence"], status["nodes"]
    on, held_by = "", status["shards"]["masters"] or {}
    if persistence.get("masters"):
        on = (" (on every master)" if len(persistence["masters"]) == len(held_by) else
              f" (on master {', '.join(persistence['masters'])})")
    if not persistence["checked"]:
        out.append(f"could not check Redis persistence{on} (CONFIG GET: "
                   f"{persistence['error']}): make sure it runs with appendonly yes")
    elif persistence["appendonly"] == "no" and not persistence["save"]:
        out.append(PERSISTENCE_OFF + on)
    elif persistence["appendonly"] == "no":
        out.append(f"Redis{on} persists only by snapshots (save \"{persistence['save']}\"): a "
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
        out.append(f"{status['dead_letters']} message(s) in the dead-letter list "
                   f"{dead_lists(keys)}: see `siocluster dead list`")
    return out


def cmd_status(cluster: Cluster, args) -> int:
    status = collect_status(cluster)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    redis, nodes, inbox = status["redis"], status["nodes"], status["inbox"]
    print(f"cluster          {status['prefix']} on {redis['url']}"
          + (f" (Redis {redis['version']})" if redis["version"] else ""))
    held_by = status["shards"]["masters"]
    print(f"shards           {status['shards']['count']}" + (
        f", on {len(held_by)} masters: " + "; ".join(
            f"{master} holds {', '.join(map(str, held)) or 'none'}"
            for master, held in held_by.items()) if held_by is not None else ""))
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


# ---- plumbing --------------------------------------------------------------------------------

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
    dead = commands.add_parser("dead", parents=[common], help="the dead-letter list (one a shard)")
    actions = dead.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = command(actions, "list", cmd_dead_list, "the records, the newest first")
    listing.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    show = command(actions, "show", cmd_dead_show, "one record, as pretty JSON")
    show.add_argument("which", metavar="INDEX|ID", help="its index in `dead list` (0 the "
                      "newest; SHARD:INDEX with several shards), or its message's id")
    show.add_argument("--envelope", action="store_true", help="only its message, decoded")
    again = command(actions, "requeue", cmd_dead_requeue, "a record's message back to the "
                    "end of its client's queue, its attempt count kept")
    which = again.add_mutually_exclusive_group(required=True)
    which.add_argument("which", metavar="INDEX|ID", nargs="?",
                       help="its index (SHARD:INDEX) or message id")
    which.add_argument("--all", action="store_true",
                       help="every record, the oldest first (of each shard)")
    purge = command(actions, "purge", cmd_dead_purge,
                    "delete the whole dead-letter list (every shard's)")
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
