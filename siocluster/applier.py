"""What an io-node does with the commands app-nodes send: one small method per kind.

`CommandApplier` is a part of `IoNode` (a mixin, so that applying a command is a method call
on the node that holds the clients): ``apply(command)`` runs ``_apply_<kind>``. A command
touches only the clients this io-node holds; a command for a client held elsewhere is
ignored here. Answers the app tier sends back to waiting clients (acks, connect verdicts)
find them in the node's ``_pending_acks`` and ``_pending_connects``.
"""

from . import engine
from .envelope import args_to_data, dumps, pack_args, unpack_args, with_arg


class CommandApplier:
    """Applies commands to the clients of an io-node; `IoNode` provides ``sio`` (the
    python-socketio server), ``redis``, ``fire`` (the seed's io-node events) and the pending
    answers ``_pending_acks`` (envelope id -> eio sid, namespace, ack id, deadline) and
    ``_pending_connects`` (envelope id -> the connect's verdict)."""

    def apply(self, command: dict) -> None:
        """Apply one command to the clients held here; others' clients are not touched."""
        getattr(self, f"_apply_{command['m']}")(command, command.get("ns", "/"))

    def _apply_emit(self, command: dict, ns: str) -> None:
        # JSON text as the app-node wrote it, written into the packet unread (unless bytes)
        args = command.get("json")
        if args is None:
            args = unpack_args(command)
        if "@" in command:
            # its offset: a client that comes back says it saw it
            at = command["@"]
            args = with_arg(args, at) if isinstance(args, str) else [*args, at]
        engine.emit(self.sio, command["event"], args, to=command.get("to"),
                    skip=command.get("skip"), namespace=ns, binary="bin" in command)
        if self.hooks.get("app publish"):
            command.setdefault("args", unpack_args(command))
            self.fire("app publish", command)

    def _apply_let_go(self, command: dict, ns: str) -> None:
        client = self.clients.get(command["sid"])
        if client is not None and client.eio_sid == command["conn"]:
            self.let_go(client.eio_sid)

    def _apply_enter_room(self, command: dict, ns: str) -> None:
        if self.holds(command["sid"], ns):
            self.sio.enter_room(command["sid"], command["room"], namespace=ns)
            self.fire("app subscribe-to-channel", command)

    def _apply_leave_room(self, command: dict, ns: str) -> None:
        if self.holds(command["sid"], ns):
            self.sio.leave_room(command["sid"], command["room"], namespace=ns)
            self.fire("app unsubscribe-from-channel", command)

    def _apply_close_room(self, command: dict, ns: str) -> None:
        self.sio.close_room(command["room"], namespace=ns)

    def _apply_disconnect(self, command: dict, ns: str) -> None:
        if self.holds(command["sid"], ns):
            self.sio.disconnect(command["sid"], namespace=ns)

    def _apply_ack(self, command: dict, ns: str) -> None:
        pending = self._pending_acks.pop(command["id"], None)
        if pending is not None:
            eio_sid, namespace, ack_id, _ = pending
            engine.send_ack(self.sio, eio_sid, namespace, ack_id,
                            command.get("json") or unpack_args(command), binary="bin" in command)

    def _apply_call(self, command: dict, ns: str) -> None:
        if self.holds(command["sid"], ns):
            args = unpack_args(command)
            reply_key = command["reply"]
            self.sio.emit(command["event"], args_to_data(args) if args else None,
                          to=command["sid"], namespace=ns,
                          callback=lambda *answer: self._reply(reply_key, answer))

    def _apply_app(self, command: dict, ns: str) -> None:
        self.fire(f"app {command['type']}", command)

    def holds(self, sid: str, namespace: str) -> bool:
        """Whether this io-node holds the client (connected, or connecting right now)."""
        manager = self.sio.manager
        return manager.is_connected(sid, namespace) or manager.is_pre_connected(sid, namespace)

    def _apply_verdict(self, command: dict, ns: str) -> None:
        pending = self._pending_connects.get(command["id"])
        ok, error = bool(command["ok"]), command.get("error")
        if pending is not None:
            pending.set((ok, error))
            return
        sid = command.get("sid")
        if not ok and sid and self.sio.manager.is_connected(sid, ns):
            # the verdict came after the timeout let the client in: honour it now
            self.sio.disconnect(sid, namespace=ns)

    def _reply(self, key: str, answer) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(key, dumps(pack_args(answer)))
        pipe.expire(key, 60)
        pipe.execute()
