"""What travels through Redis: client messages (envelopes) and commands, as versioned JSON.

An `Envelope` is what an io-node pushes to the inbox for every client connect, event and
disconnect. A command is what an app-node sends back (emit, enter_room, ack, ...); commands
travel in batches, one stream entry per batch. Bytes anywhere in the arguments travel
base64-encoded, the way python-socketio's managers carry binary packets. Nothing is ever
unpickled: a malformed message raises `MessageError` and is skipped by its reader.
"""

import base64
import dataclasses
import itertools
import json
import os
import time
import uuid
from typing import Any, List, Optional

import orjson
from socketio.packet import Packet

VERSION = 1
# command batches: 2 since emits and acks carry their arguments as JSON text ("json"). An
# io-node reads this version and the one before, so io-nodes are upgraded first; one
# older than 2 skips a batch of 2, logging it, rather than send clients empty emits
BATCH_VERSION = 2
BATCH_VERSIONS = (1, 2)
KINDS = ("connect", "event", "disconnect")
# the app's lifecycle handlers: a client never reaches them by naming an event after them
RESERVED_EVENTS = ("connect", "disconnect", "no-client", "connect_error")


class MessageError(ValueError):
    """Raised for data in Redis that is not a valid envelope or command batch."""


def new_id() -> str:
    """An id no other process makes: a random prefix drawn once per process (again in a
    forked child) and a counter; a uuid4 per message cost a system call each."""
    return f"{_ids.prefix}{next(_ids.counter):x}"


class _Ids:
    def __init__(self):
        self.prefix, self.counter = uuid.uuid4().hex[:20], itertools.count()


_ids = _Ids()
os.register_at_fork(after_in_child=_ids.__init__)


# ---- arguments: JSON with binary attachments ---------------------------------------------

def has_binary(data) -> bool:
    """Whether bytes are anywhere in ``data`` (python-socketio's ``data_is_binary``, without
    a list built at each level: it runs on every event in and out)."""
    pending = [data]
    while pending:
        item = pending.pop()
        if isinstance(item, (bytes, bytearray)):
            return True
        if isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
    return False


def pack_args(args) -> dict:
    """Arguments as JSON-safe data: ``{"args": [...]}`` plus ``"bin"`` when bytes are in it."""
    args = list(args)
    if has_binary(args):
        data, attachments = Packet.deconstruct_binary(args)
        return {"args": data, "bin": [base64.b64encode(a).decode() for a in attachments]}
    return {"args": args}


def event_data(event: str, args_json: str) -> str:
    """The JSON text of ``[event, *args]`` from the text of the ``args`` array, as
    `pack_json` wrote it."""
    return "[" + dumps(event) + ("," + args_json[1:] if len(args_json) > 2 else "]")


def with_arg(args_json: str, extra) -> str:
    """The text of a JSON array with one more item at its end."""
    return args_json[:-1] + ("," if len(args_json) > 2 else "") + dumps(extra) + "]"


def pack_json(args) -> dict:
    """Arguments an io-node sends clients: ``{"json": "[...]"}``, their JSON text, which it
    writes into each packet as it is, never parsing it; `pack_args`'s form when bytes are
    in them. The handler that passed something JSON cannot hold hears it from here."""
    args = list(args)
    text = fast_dumps(args)         # bytes are rare: not looked for first
    if text is not None:
        return {"json": text}
    return pack_args(args) if has_binary(args) else {"json": dumps(args)}


def unpack_args(message: dict) -> list:
    text = message.get("json")
    args = message.get("args", []) if text is None else loads(text)
    if not isinstance(args, list):
        raise MessageError("args must be a list")
    attachments = message.get("bin")
    if attachments:
        try:
            args = Packet.reconstruct_binary(args, [base64.b64decode(a) for a in attachments])
        except (ValueError, TypeError, IndexError, KeyError) as exc:
            raise MessageError(f"bad binary attachments: {exc}")
    return args


def args_to_data(args: list) -> Any:
    """python-socketio's convention: one argument as itself, several as a tuple."""
    if len(args) == 1:
        return args[0]
    return tuple(args)


def data_to_args(data: Any) -> list:
    """The reverse of `args_to_data`; ``None`` means no argument."""
    if data is None:
        return []
    if isinstance(data, tuple):
        return list(data)
    return [data]


# orjson where it gives the standard library's answer, several times faster; the standard
# library for what orjson refuses or reads otherwise (lone surrogates, integers past 64
# bits, NaN, dataclasses and datetimes, which json refuses too), so results never differ
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME


def fast_dumps(obj) -> Optional[str]:
    """orjson's text of ``obj``, or None where orjson refuses it (bytes, or what only the
    standard library encodes)."""
    try:
        return orjson.dumps(obj, option=_ORJSON_OPTIONS).decode()
    except TypeError:
        return None


def dumps(obj, **_) -> str:
    """Compact JSON text, not ASCII-escaped (as ``json.dumps(obj, separators=(",", ":"),
    ensure_ascii=False)``)."""
    text = fast_dumps(obj)
    return text if text is not None else json.dumps(obj, separators=(",", ":"),
                                                    ensure_ascii=False)


def parse(raw) -> Any:
    """``json.loads``, raising its errors."""
    try:
        return orjson.loads(raw)
    except (TypeError, ValueError):
        return json.loads(raw)


def loads(raw) -> Any:
    try:
        return parse(raw)
    except (TypeError, ValueError) as exc:
        raise MessageError(f"not JSON: {exc}")


def _packet_dumps(obj, **kwargs) -> str:
    text = fast_dumps(obj)
    # what orjson refuses: ASCII-escaped, as python-socketio's own
    return text if text is not None else json.dumps(obj, **kwargs)


class JSON:
    """The json module python-socketio encodes and decodes packets with on io-nodes (it
    is process-wide: python-socketio sets it on its `Packet` class)."""

    dumps = staticmethod(_packet_dumps)
    loads = staticmethod(parse)


# ---- envelopes: io-node -> inbox -> app-node ---------------------------------------------

@dataclasses.dataclass
class Envelope:
    """One client connect, event or disconnect on its way to the app tier.

    ``node`` is the id of the io-node holding the client, ``client`` the client info its
    io-node attached (the seed's ``getClientInfo``). ``ack`` tells that the client waits
    for an answer. ``attempt`` counts deliveries to app-nodes, so handlers can be
    idempotent.
    """

    kind: str
    namespace: str
    sid: str
    node: str
    client: dict = dataclasses.field(default_factory=dict)
    event: Optional[str] = None
    args: List[Any] = dataclasses.field(default_factory=list)
    ack: bool = False
    environ: Optional[dict] = None    # connect: a JSON-safe part of the WSGI environ
    auth: Any = None                  # connect: what the client sent as auth
    reason: Optional[str] = None      # disconnect: why
    conn: Optional[str] = None        # connect, disconnect: the connection (recovery)
    recovered: bool = False           # connect: the client came back as itself
    id: str = dataclasses.field(default_factory=new_id)
    ts: float = dataclasses.field(default_factory=time.time)
    attempt: int = 0
    version: int = VERSION

    def encode(self) -> str:
        message = {"v": self.version, "id": self.id, "kind": self.kind, "ns": self.namespace,
                   "sid": self.sid, "node": self.node, "client": self.client, "ts": self.ts,
                   "attempt": self.attempt}
        if self.kind == "event":
            message["event"] = self.event
            message["args"] = list(self.args)
            if self.ack:
                message["ack"] = True
        elif self.kind == "connect":
            message["environ"] = self.environ or {}
            message["args"] = [self.auth]
            if self.recovered:
                message["recovered"] = True
        elif self.reason is not None:
            message["reason"] = self.reason
        if self.conn is not None:
            message["conn"] = self.conn
        text = fast_dumps(message)      # bytes in the arguments are rare: not looked for first
        if text is None and "args" in message:
            message.update(pack_args(message["args"]))
        return text if text is not None else dumps(message)

    @classmethod
    def decode(cls, raw) -> "Envelope":
        message = loads(raw)
        if not isinstance(message, dict):
            raise MessageError("an envelope must be a JSON object")
        if message.get("v") != VERSION:
            raise MessageError(f"unsupported envelope version {message.get('v')!r}")
        kind = message.get("kind")
        if kind not in KINDS:
            raise MessageError(f"unknown envelope kind {kind!r}")
        for key in ("id", "ns", "sid", "node"):
            if not isinstance(message.get(key), str):
                raise MessageError(f"envelope field {key!r} must be a string")
        client = message.get("client") or {}
        if not isinstance(client, dict):
            raise MessageError("envelope field 'client' must be an object")
        args = unpack_args(message)
        envelope = cls(kind=kind, namespace=message["ns"], sid=message["sid"],
                       node=message["node"], client=client, id=message["id"],
                       ts=float(message.get("ts") or 0), attempt=int(message.get("attempt", 0)))
        if kind == "event":
            if not isinstance(message.get("event"), str):
                raise MessageError("an event envelope needs an event name")
            envelope.event = message["event"]
            envelope.args = args
            envelope.ack = bool(message.get("ack"))
        elif kind == "connect":
            envelope.environ = message.get("environ") or {}
            envelope.auth = args[0] if args else None
            envelope.recovered = message.get("recovered") is True
        else:
            envelope.reason = message.get("reason")
        if isinstance(message.get("conn"), str):
            envelope.conn = message["conn"]
        return envelope


# ---- commands: app-node -> stream -> io-nodes --------------------------------------------
# The schema, then one constructor per kind: the only places a command is spelled out.

COMMANDS = {
    # name: the fields it must carry
    "emit": ("ns", "event"),            # + to, skip, json (or args/bin)
    "enter_room": ("ns", "sid", "room"),
    "leave_room": ("ns", "sid", "room"),
    "close_room": ("ns", "room"),
    "disconnect": ("ns", "sid"),
    "ack": ("id",),                     # answer to a client's event: + json (or args/bin)
    "verdict": ("id", "ok"),            # answer to a connect: + error
    "call": ("ns", "sid", "event", "reply"),  # emit that wants the client's answer
    "app": ("type",),                   # a custom app message for io-node code (seed API)
    "let_go": ("ns", "sid", "conn"),    # a client came back elsewhere: drop its old connection
}


def emit_command(event: str, args: list, namespace: str, to=None, skip=None) -> dict:
    """Emit ``event`` to one client (a sid), a room, a list of rooms, or the whole
    namespace (``to`` None), less ``skip`` (a sid or a list of sids)."""
    command = {"m": "emit", "ns": namespace, "event": event, **pack_json(args)}
    if to is not None:
        command["to"] = to
    if skip is not None:
        command["skip"] = skip
    return command


def room_command(method: str, sid: str, room: str, namespace: str) -> dict:
    """``enter_room`` or ``leave_room``: applied by the io-node holding ``sid``."""
    if method not in ("enter_room", "leave_room"):
        raise ValueError(f"not a room command: {method!r}")
    return {"m": method, "ns": namespace, "sid": sid, "room": room}


def close_room_command(room: str, namespace: str) -> dict:
    return {"m": "close_room", "ns": namespace, "room": room}


def disconnect_command(sid: str, namespace: str) -> dict:
    return {"m": "disconnect", "ns": namespace, "sid": sid}


def let_go_command(sid: str, conn: str, namespace: str) -> dict:
    return {"m": "let_go", "ns": namespace, "sid": sid, "conn": conn}


def ack_command(message_id: str, args: list) -> dict:
    """The answer to a client's event (the envelope ``message_id``) that asked for one."""
    return {"m": "ack", "id": message_id, **pack_json(args)}


def verdict_command(message_id: str, sid: str, namespace: str, ok: bool,
                    error: Optional[dict] = None) -> dict:
    """Let a connecting client in, or refuse it with ``error`` (``message``, ``data``)."""
    command = {"m": "verdict", "id": message_id, "ok": ok, "sid": sid, "ns": namespace}
    if not ok:
        command["error"] = error
    return command


def call_command(event: str, args: list, sid: str, namespace: str, reply: str) -> dict:
    """Emit to one client and push its answer to the list ``reply``."""
    return {"m": "call", "ns": namespace, "sid": sid, "event": event, "reply": reply,
            **pack_args(args)}


def app_command(type: str, data: Any, namespace: str, recipients: List[dict],
                excluded: List[str]) -> dict:
    """A custom message for io-node code (the seed's ``app <type>`` io-node event)."""
    return {"m": "app", "type": type, "ns": namespace, "data": data,
            "recipients": list(recipients), "except": list(excluded)}


def encode_batch(commands: List[dict]) -> str:
    return dumps({"v": BATCH_VERSION, "c": commands})


def decode_batch(raw) -> List[dict]:
    message = loads(raw)
    if not isinstance(message, dict) or message.get("v") not in BATCH_VERSIONS:
        raise MessageError("a command batch must be a JSON object of a version this io-node "
                           f"reads {BATCH_VERSIONS} (upgrade io-nodes before app-nodes)")
    commands = message.get("c")
    if not isinstance(commands, list):
        raise MessageError("a command batch needs a list of commands")
    for command in commands:
        check_command(command)
    return commands


def check_command(command) -> None:
    if not isinstance(command, dict):
        raise MessageError("a command must be a JSON object")
    required = COMMANDS.get(command.get("m"))
    if required is None:
        raise MessageError(f"unknown command {command.get('m')!r}")
    missing = [key for key in required if key not in command]
    if missing:
        raise MessageError(f"command {command['m']!r} lacks {', '.join(missing)}")
    text = command.get("json")
    if text is not None and not (isinstance(text, str) and text[:1] == "[" and text[-1:] == "]"):
        raise MessageError(f"command {command['m']!r}: json must be the text of a JSON array")
