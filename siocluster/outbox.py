"""An io-node's outbox: what its clients did, on its way to the inbox, bounded.

The io-node's Socket.IO handlers `put` an envelope here and return at once; the io-node's
push loop calls `push`, which sends what waits in batches (one round trip for many
messages, in order) and resends a batch after a failure. While Redis is unreachable or
slow the outbox fills up to ``outbox_size``, then refuses connects and events with a
reason the client is told; a disconnect is never refused for space (there is one per
client, so the outbox stays bounded all the same)::

    outbox = Outbox(inbox, state, size=10_000, max_bytes=64 << 20, max_message_size=1_000_000)
    refusal = outbox.put(envelope)          # None, or why it was refused
    refused = outbox.push(timeout=1.0)      # what the inbox refused for space
"""

from typing import List, Optional

import gevent.queue

from . import defaults
from .envelope import Envelope
from .inbox import Inbox
from .recovery import Recovery
from .state import ClusterState

# What a refused client message is told: errors say what to do.
OUTBOX_FULL = "server busy: the cluster cannot take messages right now, try again shortly"
INBOX_FULL = "server busy: too many messages are waiting, try again shortly"
NOT_TEXT = "message refused: it is not valid UTF-8 text"


class Outgoing:
    """An envelope queued for the inbox, with what is needed to refuse it later."""

    __slots__ = ("raw", "size", "record", "kind", "id", "sid", "namespace", "event", "ack_id",
                 "node", "conn")

    def __init__(self, raw: str, size: int, record: Optional[dict], envelope: Envelope,
                 ack_id=None, kind: Optional[str] = None):
        self.raw, self.size, self.record, self.ack_id = raw, size, record, ack_id
        self.kind, self.id, self.sid = kind or envelope.kind, envelope.id, envelope.sid
        self.namespace, self.event = envelope.namespace, envelope.event
        self.node, self.conn = envelope.node, envelope.conn


class Outbox:
    """Envelopes waiting for the inbox, in order.

    :param inbox: the cluster's `Inbox`.
    :param state: the cluster's `ClusterState` (a connect's client record goes with it).
    :param size: connects and events that may wait (``outbox_size``).
    :param max_bytes: bytes of them that may wait (``outbox_max_bytes``).
    :param max_message_size: bytes of one encoded envelope, disconnects excepted.
    :param recovery: the cluster's `Recovery`, to park clients whose connection dropped.
    """

    def __init__(self, inbox: Inbox, state: ClusterState, size: int, max_bytes: int,
                 max_message_size: int, recovery: Optional[Recovery] = None):
        self.inbox, self.state, self.recovery = inbox, state, recovery
        self.size, self.max_bytes, self.max_message_size = size, max_bytes, max_message_size
        self._queue = gevent.queue.Queue()
        self._unsent: List[Outgoing] = []      # the batch being pushed, resent after a failure
        self.bytes = 0                         # of what waits, queued and unsent

    def __len__(self) -> int:
        return self._queue.qsize() + len(self._unsent)

    def park(self, envelope: Envelope) -> None:
        """Queue a client's parking (`Recovery.park`): its connection ``envelope.conn``
        dropped, and ``envelope`` is the disconnect to push if it does not come back in
        time. Never refused, like a disconnect."""
        raw = envelope.encode()
        size = len(raw.encode("utf-8", "surrogateescape"))
        self._queue.put_nowait(Outgoing(raw, size, None, envelope, kind="park"))
        self.bytes += size

    def put(self, envelope: Envelope, ack_id=None, extra: Optional[dict] = None
            ) -> Optional[str]:
        """Queue an envelope, or say why not: too large, not text, or the outbox is full.
        ``extra`` adds to a connect's client record."""
        raw = envelope.encode()
        try:
            size = len(raw.encode("utf-8"))
        except UnicodeEncodeError:
            # a lone surrogate: Redis could never take it, and the push would retry forever
            return NOT_TEXT
        if envelope.kind != "disconnect":
            if size > self.max_message_size:
                return (f"message too large: {size} bytes, the limit is "
                        f"{self.max_message_size} bytes")
            if len(self) >= self.size or self.bytes + size > self.max_bytes:
                return OUTBOX_FULL
        record = None
        if envelope.kind == "connect":
            # what `ClusterState.client` returns for it, written with the push
            record = {"sid": envelope.sid, "namespace": envelope.namespace,
                      "node": envelope.node, "info": envelope.client,
                      "connected_at": envelope.ts, **(extra or {})}
        self._queue.put_nowait(Outgoing(raw, size, record, envelope, ack_id))
        self.bytes += size
        return None

    def push(self, timeout: float) -> List[Outgoing]:
        """Send what waits (after up to ``timeout`` seconds for something), many per round
        trip, in order; returns what the inbox refused for space. Raises when Redis is
        unreachable: the batch stays, and the next call sends it again."""
        if not self._unsent:
            try:
                self._unsent.append(self._queue.get(timeout=timeout))
            except gevent.queue.Empty:
                return []
            while len(self._unsent) < defaults.COMMAND_BATCH:
                try:
                    self._unsent.append(self._queue.get_nowait())
                except gevent.queue.Empty:
                    break
        batch = [item for item in self._unsent if item.kind != "park"]
        refused = self.inbox.push([(item.kind, item.sid, item.raw) for item in batch],
                                  records=[i.record for i in batch if i.record is not None],
                                  state=self.state) if batch else []
        # parked after the rest: a client's connect may be in the same batch
        self._unsent = [item for item in self._unsent if item.kind == "park"]
        self.bytes -= sum(item.size for item in batch)
        if self._unsent:
            pipe = self.inbox.redis.pipeline(transaction=False)
            for item in self._unsent:
                self.recovery.park(pipe, item.sid, item.conn or "", item.node, item.raw)
            pipe.execute()
            self.bytes -= sum(item.size for item in self._unsent)
            self._unsent = []
        return [batch[index] for index in refused]
