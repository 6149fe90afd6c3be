"""`siocluster dead ...`: the dead-letter lists, one a shard (docs/operations.md), and the
few pieces of text `siocluster.cli` shares with them.

With one shard (one Redis, the default) a record is named by its index in the list (0 the
newest) or its message's id, as always. With several a record is named ``SHARD:INDEX``
(``1:0``: the newest of shard 1), which `dead list` shows, or its message's id (every
shard is looked in); ``SHARD:INDEX`` also works with one shard (``0:3``). A requeue pushes
through the inbox of the shard of the message's client (`Inboxes.of`), whichever list the
record was in, and removes the record from the list it was found in.
"""

import json
import sys
import time
from typing import List, Tuple

from .envelope import Envelope, MessageError
from .shards import Inboxes
from .state import Keys, ShardKeys

CHUNK = 100                   # dead-letter records read per round trip
NO_SPACE = "the inbox refused it for space"


class CliError(Exception):
    """What went wrong, in one line; ``code`` is the exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# ---- text --------------------------------------------------------------------------------

def json_object(raw) -> dict:
    """A JSON object as stored, or {} for anything else."""
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def one_line(text) -> str:
    return " ".join(str(text).split())


def timestamp(ts) -> str:
    """A record's time, in UTC."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if isinstance(ts, (int, float)) \
        else "?"


def table(rows: List[List[str]]) -> List[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]


def dead_lists(keys: Keys) -> str:
    """The dead-letter list(s) of the cluster, as the command names them."""
    if len(keys.shards) == 1:
        return keys.shards[0].dead
    return f"{keys.prefix}:{{*}}:dead ({len(keys.shards)} shards)"


def label(keys: Keys, shard: ShardKeys, index: int) -> str:
    """How `dead list` names a record: its index, or ``SHARD:INDEX`` with several shards."""
    return str(index) if len(keys.shards) == 1 else f"{shard.index}:{index}"


# ---- finding records -----------------------------------------------------------------------

def find(cluster, which: str) -> Tuple[ShardKeys, int, str]:
    """A dead letter by its index (0 the newest; ``SHARD:INDEX`` with several shards) or its
    message's id: its shard, its index there and the record."""
    redis, keys, shards = cluster.redis, cluster.keys, cluster.keys.shards
    shard_at, colon, index = which.partition(":")
    if not colon:
        shard_at, index = "0", which
        if which.isdigit() and len(shards) > 1:
            raise CliError(f"the cluster has {len(shards)} shards: name a dead letter "
                           f"SHARD:INDEX as `dead list` shows it ({which} of shard 1: "
                           f"1:{which}), or by its message id")
    if shard_at.isdigit() and index.isdigit():
        if int(shard_at) >= len(shards):
            raise CliError(f"no shard {shard_at}: the cluster has {len(shards)} (0 to "
                           f"{len(shards) - 1})")
        shard = shards[int(shard_at)]
        value = redis.lindex(shard.dead, int(index))
        if value is None:
            raise CliError(f"no dead letter at index {label(keys, shard, int(index))}: "
                           f"{shard.dead} holds {redis.llen(shard.dead)}")
        return shard, int(index), value
    for shard in shards:
        for start in range(0, redis.llen(shard.dead), CHUNK):
            for at, value in enumerate(redis.lrange(shard.dead, start, start + CHUNK - 1), start):
                if json_object(json_object(value).get("raw")).get("id") == which:
                    return shard, at, value
    raise CliError(f"no dead letter at index or with message id {which!r}")


def oldest_first(redis, dead: str) -> List[str]:
    """One list's dead letters, the oldest first, read in chunks from the tail (indexes from
    the tail do not move as new dead letters come in at the head)."""
    values: List[str] = []
    for start in range(0, redis.llen(dead), CHUNK):
        values += reversed(redis.lrange(dead, -(start + CHUNK), -start - 1))
    return values


# ---- commands ------------------------------------------------------------------------------

def cmd_dead_list(cluster, args) -> int:
    redis, keys, limit = cluster.redis, cluster.keys, max(1, args.limit)
    pipe = redis.pipeline(transaction=False)
    for shard in keys.shards:
        pipe.llen(shard.dead)
        pipe.lrange(shard.dead, 0, limit - 1)
    replies = pipe.execute()
    length = sum(replies[0::2])
    found = [(shard, at, value) for shard, values in zip(keys.shards, replies[1::2])
             for at, value in enumerate(values)]
    if len(keys.shards) > 1:        # the newest of every shard's newest
        def newest(item):
            ts = json_object(item[2]).get("ts")
            return -ts if isinstance(ts, (int, float)) else 0.0
        found = sorted(found, key=lambda item: (newest(item), item[1], item[0].index))[:limit]
    print(f"{dead_lists(keys)}: {length} dead letters" + (", newest first" if length else "")
          + (f" (the newest {len(found)}; --limit N for more)" if len(found) < length else ""))
    rows = [["INDEX" if len(keys.shards) == 1 else "SHARD:INDEX", "TIME (UTC)", "APP-NODE",
             "ATTEMPTS", "MESSAGE", "SID", "ERROR"]]
    for shard, at, value in found:
        record = json_object(value)
        envelope = json_object(record.get("raw"))     # {} when cut, malformed or missing
        attempts = record.get("attempts", envelope.get("attempt"))
        message = str(envelope.get("kind") or "(unreadable)")
        if envelope.get("event") is not None:
            message += f" {str(envelope['event'])[:40]!r}"
        rows.append([label(keys, shard, at), timestamp(record.get("ts")),
                     str(record.get("app_node") or ""), "" if attempts is None else str(attempts),
                     message + (" (cut)" if record.get("cut") else ""),
                     str(envelope.get("sid") or ""),
                     one_line(record.get("error") or "" if record else value)[:80]])
    if found:
        print("\n".join(table(rows)))
    return 0


def cmd_dead_show(cluster, args) -> int:
    value = find(cluster, args.which)[2]
    if args.envelope:
        value = json_object(value).get("raw") or ""
    found = json_object(value)
    print(json.dumps(found, indent=2, ensure_ascii=False) if found else value)
    return 0


def requeue(cluster, inboxes: Inboxes, dead: str, value: str) -> str:
    """Push a dead letter's message back to the end of its client's queue (in its client's
    shard), then remove the record from list ``dead``; returns what was done, or raises
    `CliError` saying why it cannot be."""
    record = json_object(value)
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
    if inboxes.of(envelope.sid).push([(envelope.kind, envelope.sid, raw)]):
        raise CliError(f"{NO_SPACE} (INBOX_MAXLEN, INBOX_MAX_BYTES or the client's "
                       "CLIENT_QUEUE_MAXLEN): try again once the backlog is handled")
    what = " ".join(filter(None, (envelope.kind, envelope.event and repr(envelope.event))))
    what += f" of {envelope.sid} (message {envelope.id}, attempt {envelope.attempt})"
    if not cluster.redis.lrem(dead, 1, value):
        what += "; its record was already gone from the list (requeued or purged meanwhile?)"
    if not cluster.redis.hexists(cluster.keys.shard(envelope.sid).clients, envelope.sid):
        what += f"; note: client {envelope.sid} is no longer connected"
    return what


def cmd_dead_requeue(cluster, args) -> int:
    keys = cluster.keys
    inboxes = Inboxes(cluster.redis, keys, cluster.config)
    if not args.all:
        shard, index, value = find(cluster, args.which)
        print(f"requeued [{label(keys, shard, index)}] "
              f"{requeue(cluster, inboxes, shard.dead, value)}")
        return 0
    done, left = 0, 0
    for shard in keys.shards:       # a client's records are all in its shard's list
        for value in oldest_first(cluster.redis, shard.dead):
            try:
                print(f"requeued {requeue(cluster, inboxes, shard.dead, value)}")
                done += 1
            except CliError as exc:
                if str(exc).startswith(NO_SPACE):
                    raise CliError(f"stopped after {done} requeued: {exc}")
                record = json_object(value)
                print(f"left the record of {timestamp(record.get('ts'))} "
                      f"({one_line(record.get('error') or '')[:60]}): {exc}", file=sys.stderr)
                left += 1
    print(f"{done} requeued, {left} left in {dead_lists(keys)}")
    return 0


def cmd_dead_purge(cluster, args) -> int:
    redis, keys = cluster.redis, cluster.keys
    name = dead_lists(keys)
    pipe = redis.pipeline(transaction=False)
    for shard in keys.shards:
        pipe.llen(shard.dead)
    count = sum(pipe.execute())
    if not count:
        print(f"{name} is empty: nothing to delete")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise CliError(f"not deleting the {count} dead letters of {name} without "
                           "confirmation: there is no terminal to ask on; run with --yes", 2)
        try:
            answer = input(f"delete all {count} dead letters of {name}? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            raise CliError("nothing deleted")
    deleted = 0
    for shard in keys.shards:       # one MULTI a shard: a shard's keys are in one slot
        pipe = redis.pipeline(transaction=True)
        pipe.llen(shard.dead)
        pipe.delete(shard.dead)
        deleted += pipe.execute()[0]
    print(f"deleted {deleted} dead letters from {name}")
    return 0
