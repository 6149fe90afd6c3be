"""How an app-node calls an `App`'s handlers: python-socketio's conventions for a connect
(its verdict), an event (its ack), a disconnect, and the first message of a client this
app-node did not see connect (``no-client``). `App` inherits `Dispatch`; the handler API
itself is in `siocluster.app`."""

from socketio import exceptions as sio_exceptions

from .commands import HandlerContext
from .envelope import ack_command, data_to_args, verdict_command
from .node import REDIS_DOWN

# what a refused client is told (python-socketio's words where it has them)
UNHANDLED_NAMESPACE = "Unable to connect"
HANDLER_FAILED = "Connection refused: the server could not handle it"


class Dispatch:
    """The app-node's side of an `App`: `dispatch` one message to its handler."""

    def dispatch(self, context: HandlerContext) -> None:
        """Call the handler for the message of ``context`` (the app-node calls it), with
        python-socketio's conventions; what it sends joins ``context.commands``."""
        envelope, app, commands = context.envelope, self, context.node.commands
        ns, sid = envelope.namespace, envelope.sid
        if envelope.kind == "connect":
            commands.remember(sid, envelope.node)
            ok, error = self._connect(context)
            context.refused = not ok
            if not ok:
                del context.commands[:]    # a refused client gets nothing but its refusal
            elif self.admin is not None:
                self.admin.saw(envelope)
            # the verdict goes first: the io-node lets the client in before the handler's emits
            context.commands.insert(0, (envelope.node,
                                        verdict_command(envelope.id, sid, ns, ok, error)))
            return
        if self.admin is not None:
            self.admin.saw(envelope)
        if not commands.seen(sid):
            commands.remember(sid, envelope.node)
            handler, args = app.handler_for("no-client", ns, (sid, envelope.client))
            if handler is not None:
                handler(*args)
        if envelope.kind == "disconnect":
            handler, args = app.handler_for("disconnect", ns, (sid, envelope.reason))
            if handler is not None:
                try:
                    handler(*args)
                except TypeError:
                    handler(*args[:-1])    # the older disconnect(sid) signature
            return
        handler, args = app.handler_for(envelope.event, ns, (sid, *envelope.args))
        if handler is None:
            context.node.logger.debug("app-node %s: no handler for %r in %s", context.node.id,
                                      envelope.event, ns)
            return
        result = handler(*args)
        if envelope.ack:
            commands.send(ack_command(envelope.id, data_to_args(result)), envelope.node)

    def handles(self, namespace: str) -> bool:
        """Whether clients may connect to ``namespace``: ``/``, as in python-socketio, or
        one with handlers (its own, a catch-all ``*``, or a class-based namespace)."""
        return namespace == "/" or any(
            namespace in registry or "*" in registry
            for registry in (self.handlers, self.namespace_handlers))

    def _connect(self, context: HandlerContext):
        """The verdict on a connect: ``(True, None)`` or ``(False, error)``. Only an
        explicit yes lets a client in: a handler that raises refuses it (the exception goes
        to the log, the client gets a generic message), as python-socketio does."""
        envelope = context.envelope
        if not self.handles(envelope.namespace):
            return False, {"message": UNHANDLED_NAMESPACE}
        handler, args = self.handler_for(
            "connect", envelope.namespace, (envelope.sid, envelope.environ, envelope.auth))
        if handler is None:
            return True, None
        try:
            try:
                result = handler(*args)
            except TypeError:
                if envelope.auth is not None:
                    raise
                result = handler(*args[:-1])   # connect(sid, environ)
        except sio_exceptions.ConnectionRefusedError as exc:
            return False, exc.error_args
        except ConnectionRefusedError as exc:
            return False, {"message": str(exc) or "Connection refused by server"}
        except REDIS_DOWN:
            raise                              # not the client's doing: handled again later
        except Exception:
            context.node.logger.exception(
                "app-node %s: the connect handler of %s raised; the client is refused",
                context.node.id, envelope.namespace)
            return False, {"message": HANDLER_FAILED}
        if result is False:
            return False, {"message": "Connection rejected by server"}
        return True, None
