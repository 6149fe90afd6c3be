"""The command streams: app-nodes write commands, every io-node reads them in order.

Two Redis streams reach an io-node: ``<prefix>:commands``, read by every io-node, and
``<prefix>:commands:<io-node id>``, for the clients of that io-node alone. One stream
entry holds one batch of commands (`encode_batch`). Writers keep a handler's commands in
order by putting them all on one stream; every entry carries a number of one cluster-wide
sequence, and a reader merges its two streams by time and that number, so each io-node
applies commands in the order they were written. A reader remembers the last
id it applied and resumes from it after an outage; the streams are trimmed
(``MAXLEN ~ stream_maxlen``), and a reader that finds entries it never read trimmed away
says how many::

    streams = CommandStreams(redis, keys, maxlen=100_000)
    streams.send([(None, command)])                    # an app-node: to every io-node
    reader = streams.reader(node_id, logger)           # an io-node
    for command in reader.read(count=256, block=1.0):     # in the order written
        ...
"""

import logging
from typing import Dict, List, Optional, Sequence, Tuple

from redis.exceptions import NoScriptError, ResponseError

from .connection import Direct
from .envelope import MessageError, decode_batch, encode_batch
from .state import Keys

# A command with the io-node it is for (None: every io-node)
Routed = Tuple[Optional[str], dict]


# Append a batch of commands to a stream with the next number of the cluster-wide command
# sequence: entries of two streams written in the same millisecond still tell which came
# first. KEYS: stream, sequence; ARGV: maxlen, batch.
_WRITE = """
local seq = redis.call('INCR', KEYS[2])
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'b', ARGV[2], 's', seq)
"""


def _entry_id(entry_id: str) -> Tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _order(entry_id: str, fields: dict) -> Tuple[int, int, int]:
    """Where an entry falls among those of both streams: by time, then by the sequence
    number it was written with (entries written by hand have none), then by its id."""
    ms, seq = _entry_id(entry_id)
    try:
        number = int(fields.get("s", -1))
    except (TypeError, ValueError):
        number = -1
    return ms, number, seq


class CommandStreams:
    """Writes command batches to the streams.

    :param redis: a redis-py client with ``decode_responses=True``.
    :param keys: the cluster's `Keys`.
    :param maxlen: entries kept in a stream (approximately) for readers that fall behind.
    """

    def __init__(self, redis, keys: Keys, maxlen: int):
        self.redis = redis
        self.keys = keys
        self.maxlen = maxlen
        self._write = redis.register_script(_WRITE)

    def write(self, pipe, batches: Sequence[Sequence[Routed]],
              shards: Optional[Sequence] = None) -> List[Tuple[str, str, str]]:
        """Add to ``pipe`` the commands of handlers (one batch each, in the order they
        ran), as few entries as order allows; returns the entries, for `rewrite`.

        With several shards, each batch goes to the stream of its shard (``shards``: the
        `ShardKeys` of each batch's client, None for the first shard): a client's
        handlers' commands stay in order on one stream, and the shards share the load.

        A handler's commands meant for one io-node's clients go to that node's stream; if
        any is addressed more widely, all of them go to the stream every io-node reads. An
        io-node applies the entries of its two streams in the order of their cluster-wide
        sequence numbers, so handlers' commands may share an entry only while no entry of
        the other kind of stream falls between them."""
        if len(self.keys.shards) > 1:
            return self._write_sharded(pipe, batches, shards or [None] * len(batches))
        shared = self.keys.commands
        entries: List[Tuple[str, List[dict]]] = []
        open_entries: Dict[str, List[dict]] = {}
        for batch in batches:
            if not batch:
                continue
            if any(node is None for node, _ in batch):
                routed = [(shared, command) for _, command in batch]
                open_entries = {shared: open_entries[shared]} if shared in open_entries else {}
            else:
                routed = [(self.keys.node_commands(node), command) for node, command in batch]
                open_entries.pop(shared, None)
            for stream, command in routed:
                if stream not in open_entries:
                    open_entries[stream] = []
                    entries.append((stream, open_entries[stream]))
                open_entries[stream].append(command)
        writes = [(stream, self.keys.command_seq, encode_batch(commands))
                  for stream, commands in entries]
        self._add(pipe, writes)
        return writes

    def _write_sharded(self, pipe, batches, shards) -> List[Tuple[str, str, str]]:
        by_shard: Dict[int, List[dict]] = {}
        for batch, shard in zip(batches, shards):
            if batch:
                by_shard.setdefault(shard.index if shard is not None else 0, []).extend(
                    command for _, command in batch)
        writes = [(self.keys.shards[index].commands, self.keys.shards[index].command_seq,
                   encode_batch(commands)) for index, commands in by_shard.items()]
        self._add(pipe, writes)
        return writes

    def _add(self, pipe, writes: List[Tuple[str, str, str]]) -> None:
        for stream, seq, payload in writes:
            # by sha: redis-py would ask SCRIPT EXISTS in a round trip of its own first
            pipe.evalsha(self._write.sha, 2, stream, seq, self.maxlen, payload)

    def rewrite(self, writes: List[Tuple[str, str, str]]) -> None:
        """Write again entries whose pipeline failed because Redis had lost the script (a
        restart, SCRIPT FLUSH): nothing of them was written."""
        self.redis.script_load(_WRITE)
        pipe = self.redis.pipeline(transaction=False)
        self._add(pipe, writes)
        pipe.execute()

    def send(self, batch: Sequence[Routed], shard=None) -> None:
        """Write one batch now, in a round trip of its own (with several shards, to the
        stream of ``shard``, the first one's when None)."""
        pipe = self.redis.pipeline(transaction=False)
        writes = self.write(pipe, [batch], [shard])
        try:
            pipe.execute()
        except NoScriptError:
            self.rewrite(writes)

    def readers(self, node: str, logger: Optional[logging.Logger] = None
                ) -> List["StreamReader"]:
        """Readers of the streams io-node ``node`` follows, from their current ends: on one
        shard one reader of the shared stream and the node's own; with several shards,
        one reader per shard's stream, each on a connection of its own."""
        logger = logger or logging.getLogger("siocluster.io-node")
        if len(self.keys.shards) == 1:
            return [StreamReader(self.redis, [self.keys.commands, self.keys.node_commands(node)],
                                 self.maxlen, node, logger)]
        return [StreamReader(self.redis, [shard.commands], self.maxlen, node, logger, shard.index)
                for shard in self.keys.shards]

    def delete(self, node: str) -> None:
        """Drop the stream of an io-node that stopped."""
        self.redis.delete(self.keys.node_commands(node))


class StreamReader:
    """Reads streams in order, from where it left off; see the module.

    ``last_ids`` maps each stream to the last entry applied. Set ``check_due`` when entries
    may have been trimmed unread (after an outage): the next `read` looks first.
    """

    def __init__(self, redis, streams: List[str], maxlen: int, node: str,
                 logger: logging.Logger, shard: int = 0):
        self.redis = redis
        self.shard = shard          # the shard whose stream is ``streams[0]``
        self.node = node
        self.maxlen = maxlen
        self.logger = logger
        self.last_ids: Dict[str, str] = {}
        # entries ever added to each stream up to its last id (None on Redis < 7), to tell
        # when entries not read yet were trimmed away
        self.seq: Dict[str, Optional[int]] = {}
        self.check_due = False
        self.streams = streams
        # connection-state recovery: each command of the stream every io-node reads carries
        # its offset (``"@"``), which the io-node hands clients with its emits
        self.offsets = False
        self.direct = Direct(redis)       # the reads: one loop's hot path

    def start(self) -> None:
        """Follow the streams from their current ends: what was written before is not ours."""
        for stream in self.streams:
            self.last_ids[stream], self.seq[stream] = self.tip(stream)

    def tip(self, stream: str) -> Tuple[str, Optional[int]]:
        """The last id of a stream, and how many entries were ever added to it (Redis 7)."""
        try:
            info = self.redis.xinfo_stream(stream)
        except ResponseError:
            return "0-0", 0          # no such stream yet
        added = info.get("entries-added")
        return info["last-generated-id"], int(added) if added is not None else None

    def read(self, count: int, block: float) -> List[dict]:
        """The commands written since the last read, in order (from at most ``count``
        entries a stream); waits up to ``block`` seconds for some."""
        if self.check_due:
            self.check_trimmed()
            self.check_due = False
        try:
            reply = self.direct.call("XREAD", "COUNT", count, "BLOCK", int(block * 1000),
                                     "STREAMS", *self.last_ids, *self.last_ids.values())
        except Exception:
            # Redis away, most likely: whatever was trimmed meanwhile is told before anything
            # newer is applied
            self.check_due = True
            raise
        commands: List[dict] = []
        if not reply:
            return commands
        entries, cap = [], None
        # raw: a map of stream -> entries (RESP3) or pairs (RESP2); each entry is
        # [entry id, [field, value, ...]]
        for stream, items in (reply.items() if isinstance(reply, dict) else reply):
            items = [(entry_id, dict(zip(pairs[::2], pairs[1::2]))) for entry_id, pairs in items]
            entries.extend((_order(entry_id, fields), stream, entry_id, fields)
                           for entry_id, fields in items)
            if len(items) >= count:
                # this stream may have more: apply nothing newer than its last entry yet,
                # so commands of the two streams stay in the order they were written
                last = _order(*items[-1])
                cap = last if cap is None else min(cap, last)
                # far behind: make sure nothing is trimmed before we get there
                self.check_due = True
        entries.sort(key=lambda e: e[0])
        for key, stream, entry_id, fields in entries:
            if cap is not None and key > cap:
                break
            self.last_ids[stream] = entry_id
            if self.seq.get(stream) is not None:
                self.seq[stream] += 1
            try:
                batch = decode_batch(fields.get("b"))
                if self.offsets and stream == self.streams[0]:
                    for index, command in enumerate(batch):
                        command["@"] = f"{entry_id}.{index}"
                commands.extend(batch)
            except MessageError as exc:
                self.logger.error("io-node %s: skipped malformed command entry %s in %s: %s",
                                  self.node, entry_id, stream, exc)
        return commands

    def check_trimmed(self) -> None:
        """Warn, with how many, when command batches not read yet were trimmed away
        (``stream_maxlen``) during an outage or while this reader lagged behind."""
        for stream, last in list(self.last_ids.items()):
            seq = self.seq.get(stream)
            try:
                info = self.redis.xinfo_stream(stream)
            except ResponseError:
                continue             # no such stream (yet)
            added = info.get("entries-added")
            if seq is None or added is None:
                continue             # Redis < 7 does not count what it trimmed
            trimmed = int(added) - int(info["length"])
            if int(added) < seq:
                # the stream was deleted and made anew: count from here
                self.seq[stream] = trimmed
            elif trimmed > seq:
                first = info.get("first-entry")
                first_id = first[0] if first else info["last-generated-id"]
                span = (_entry_id(first_id)[0] - _entry_id(last)[0]) / 1000
                self.logger.warning(
                    "io-node %s: %d command batch(es) of %s, written in the %.1fs after %s, "
                    "were trimmed before this io-node read them (the stream keeps about %d); "
                    "its clients missed those commands. Raise STREAM_MAXLEN to ride out "
                    "longer outages.", self.node, trimmed - seq, stream, max(0.0, span), last,
                    self.maxlen)
                self.seq[stream] = trimmed

