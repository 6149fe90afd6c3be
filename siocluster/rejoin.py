"""What an io-node does for connection-state recovery (the protocol: `siocluster.recovery`).

`Rejoin` is a part of `IoNode` (a mixin), and the ``recovery`` hooks of its
`IoSocketServer`: a connect that presents a pid is looked up (`returning`) before
python-socketio picks a sid. A client that can be told exactly what it missed is claimed
and comes back with its sid; else it connects as a new client, and its old self's window
closes now. Once the app tier let it in (its connect handler sees ``recovered``), it is sent
what it missed and joins its rooms (`connected`) while the listen loop waits, so that
nothing is sent twice or skipped between the replay and the live commands. Its old
connection, if an io-node still holds it, is dropped without a word (`let_go`)::

    node.init_rejoin(sio)              # IoNode does: hooks on its server when RECOVERY_WINDOW > 0
"""

from typing import Dict, List, NamedTuple, Optional, Set, Tuple

import gevent.lock

from . import engine, transport
from .envelope import args_to_data, let_go_command, unpack_args
from .node import REDIS_DOWN
from .recovery import RECOVERABLE, Returning, later, new_pid


class Comeback(NamedTuple):
    """A client coming back on a connection: who it was, the position it said it saw, and
    what it missed up to position ``until`` (read when it was claimed)."""

    found: Returning
    offset: Optional[str]
    packets: List[Tuple[dict, str]]
    until: str


class Rejoin:
    """Connection-state recovery on an io-node. `IoNode` provides ``sio``, ``recovery``,
    ``clients``, ``state``, ``streams``, ``readers``, ``outbox``,
    ``_closing``, ``logger`` and ``id``."""

    def init_rejoin(self, sio) -> None:
        # clients may come back as themselves (RECOVERY_WINDOW): needs our server's hooks
        self.recovering = self.recovery.enabled and isinstance(sio, engine.IoSocketServer)
        if self.recovering:
            sio.recovery = self
            for reader in self.readers:
                reader.offsets = True
        self._comebacks: Dict[Tuple[str, str], Comeback] = {}
        self._quiet: Set[str] = set()      # connections dropped because their client is back
        self._applying = gevent.lock.Semaphore()     # held while commands are applied
        # the last entry applied of each shard's stream every io-node reads
        self.applied = ["0-0"] * len(self.readers)

    # ---- IoSocketServer's hooks ---------------------------------------------------------

    def returning(self, eio_sid: str, namespace: str, auth) -> Tuple[Optional[str], object]:
        """Before a connect: the sid the client comes back as (None: a new client), and its
        auth without the recovery fields."""
        if not isinstance(auth, dict) or "pid" not in auth:
            return None, auth
        if self._closing:
            return None, auth      # refused anyway: it comes back on another io-node
        auth = dict(auth)
        pid, seen = auth.pop("pid"), auth.pop("offset", None)
        auth = auth or None
        try:
            return self._claim(eio_sid, namespace, pid, seen), auth
        except REDIS_DOWN as exc:
            self.logger.warning("io-node %s: could not look up a returning client (%s): it "
                                "connects as a new one", self.id, exc)
            return None, auth

    def _claim(self, eio_sid: str, namespace: str, pid, seen) -> Optional[str]:
        found = self.recovery.find(pid)
        if found is None or found.record.get("namespace") != namespace:
            self.logger.info("io-node %s: a client came back with an unknown or expired "
                             "private id: it connects as a new client", self.id)
            return None
        until = ",".join(self.applied)
        packets = self.recovery.missed(found, seen, namespace, until=until)
        if packets is None:
            self.logger.info("io-node %s: %s came back, but what it missed cannot be told "
                             "exactly (too much, or gone from the stream): it connects as a "
                             "new client", self.id, found.sid)
            self.recovery.end_now(found.sid)
            return None
        old = self.recovery.claim(found, eio_sid, self.id)
        if old is None:
            return None
        if old:
            self._let_go_elsewhere(found, old, namespace)
        self._comebacks[(eio_sid, namespace)] = Comeback(found, seen, packets, until)
        return found.sid

    def recovery_fields(self, client, envelope) -> Tuple[Optional[Comeback], Optional[dict]]:
        """At a connect: whether the client is coming back, and what its client record adds
        (its private id, its connection, where in the shared stream its packets start)."""
        comeback = self._comebacks.get((client.eio_sid, client.namespace))
        if not self.recovering:
            return comeback, None
        old = comeback.found.record if comeback is not None else {}
        client.pid = old.get("pid") or new_pid(client.sid)
        envelope.conn, envelope.recovered = client.eio_sid, comeback is not None
        return comeback, {"pid": client.pid, "conn": client.eio_sid,
                          "since": old.get("since") or ",".join(self.applied)}

    def parked(self, client, envelope, reason, closing: bool) -> bool:
        """At a disconnect: park a client that did not mean to leave (it may come back as
        itself within the window); False when its disconnect is to be pushed now."""
        if not client.pid:
            return False
        envelope.conn = client.eio_sid
        if reason in RECOVERABLE or closing:
            self.outbox.park(envelope)
            return True
        return False

    def connect_fields(self, sid: str, namespace: str) -> dict:
        """What the CONNECT packet adds to the sid: the client's private id."""
        client = self.clients.get(sid)
        return {"pid": client.pid} if client is not None and client.pid else {}

    def connected(self, eio_sid: str, namespace: str, sid: Optional[str]) -> None:
        """After a connect was answered: a client that came back gets what it missed."""
        comeback = self._comebacks.pop((eio_sid, namespace), None)
        client = self.clients.get(sid) if sid is not None else None
        if comeback is None or client is None or client.eio_sid != eio_sid \
                or not self.sio.manager.is_connected(sid, namespace):
            return      # refused, or gone again: its disconnect is on its way
        try:
            self._catch_up(comeback, sid, namespace)
        except REDIS_DOWN as exc:
            # it would miss what it missed: it comes back again once Redis is
            self.logger.warning("io-node %s: could not replay what %s missed (%s): its "
                                "connection is closed, it will come back", self.id, sid, exc)
            transport.drop_connection(self.sio, eio_sid)

    # ---- replay -------------------------------------------------------------------------

    def _catch_up(self, comeback: Comeback, sid: str, namespace: str) -> None:
        rooms = set(self.state.rooms(sid))
        rooms.add(sid)
        # what it missed up to its claim was read then; what was applied since, now, and
        # (a short read) what the listen loop applied meanwhile, while it waits
        packets, until = self._read_on(comeback, list(comeback.packets), comeback.until,
                                       namespace, rooms)
        with self._applying:
            packets, until = self._read_on(comeback, packets, until, namespace, rooms)
            if packets is None:
                # the app disconnected it while it was away, or the stream lost what it
                # missed since it was claimed
                self.logger.warning("io-node %s: %s came back but what it missed is lost: "
                                    "disconnected", self.id, sid)
                self.sio.disconnect(sid, namespace=namespace)
                return
            # what reached it meanwhile is in the replay, sent now, then the live packets
            self.sio.release(self.clients[sid].eio_sid, drop=True)
            for command, at in packets:
                args = unpack_args(command)
                args.append(at)
                self.sio.emit(command["event"], args_to_data(args), to=sid, namespace=namespace)
            for room in rooms:
                if room != sid:
                    self.sio.enter_room(sid, room, namespace=namespace)
        self.logger.info("io-node %s: %s came back (%d missed packet(s) sent, %d room(s))",
                         self.id, sid, len(packets), len(rooms) - 1, extra={"sid": sid})

    def _read_on(self, comeback: Comeback, packets, until: str, namespace: str, rooms):
        """``packets`` and what reaches the client in the entries applied after ``until``,
        with the entry applied last; None when what it missed is lost."""
        now = ",".join(self.applied)
        if packets is None or now == until:
            return packets, until
        # from what it saw, should that be past what this io-node had applied
        seen = later(until, comeback.offset, len(self.applied))
        more = self.recovery.missed(comeback.found, seen, namespace, rooms=rooms,
                                    until=now, bounded=False)
        return (None if more is None else packets + more), now

    def apply_in_order(self, commands: list, reader) -> None:
        """Apply commands ``reader`` read, as one step a returning client's replay, or
        another shard's commands, never interleave with."""
        shard = reader.shard
        before = self.applied[shard]
        with self._applying:
            sharded = len(self.applied) > 1
            for command in commands:
                if sharded and "@" in command:
                    # its position: where every shard's stream is applied up to
                    at = list(self.applied)
                    at[shard] = command["@"]
                    command["@"] = ",".join(at)
                try:
                    self.apply(command)
                except Exception:
                    self.logger.exception("io-node %s: command %r failed", self.id, command)
            self.applied[shard] = reader.last_ids.get(reader.streams[0], before)
        if commands:
            self.count_applied(commands, self.applied[shard]
                               if self.applied[shard] != before else None)

    # ---- the old connection -------------------------------------------------------------

    def _let_go_elsewhere(self, found: Returning, old: str, namespace: str) -> None:
        node = found.record.get("node")
        if node == self.id:
            client = self.clients.get(found.sid)
            if client is not None and client.eio_sid == old:
                # before python-socketio gives the sid to the new connection
                self.let_go(old)
        elif node:
            # on the client's shard's stream when there are several (every io-node reads it)
            self.streams.send([(node, let_go_command(found.sid, old, namespace))],
                              self.state.keys.shard(found.sid))

    def let_go(self, eio_sid: str) -> None:
        """Drop a connection whose client came back on another, without a disconnect."""
        self._quiet.add(eio_sid)
        transport.drop_connection(self.sio, eio_sid)

    def quiet(self, eio_sid: str) -> bool:
        """Whether a connection that ended was let go (its client is back elsewhere)."""
        if eio_sid in self._quiet:
            self._quiet.discard(eio_sid)
            return True
        return False

    def sweep_quiet(self) -> None:
        """Forget let-go connections that are gone (bounded memory)."""
        self._quiet &= set(self.sio.eio.sockets)
