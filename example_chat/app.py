"""The chat's app-node logic: run it with ``python -m siocluster.appnode example_chat.app:app``.

It keeps nothing in the process (any app-node handles any message): a client's name and
room are in its session, the room's members in the cluster's room registry, and the
room's last 50 messages in a capped Redis list. The protocol, on namespace ``/``:

- ``join {name, room}`` -> ``{ok: true, room, members, history}`` (``members`` are the names
  in the room, sorted, each once; ``history`` the room's last 50 ``said`` messages, oldest
  first); the room gets ``presence {room, members, joined: name}``. A client in another
  room leaves it first (that room gets ``presence {room, members, left: name}``).
- ``say {text}`` -> ``{ok: true, id}``; the room, sender included, gets
  ``said {id, room, name, text, ts}`` (``ts`` in milliseconds since the epoch).
- ``leave {}`` -> ``{ok: true}``; the room gets ``presence {room, members, left: name}``.
  A disconnect does the same.
- Anything malformed -> ``{ok: false, error: "<reason>"}``, and nothing changes.
"""

import functools
import json
import time
import uuid

from siocluster import App

MAX_NAME = 32
MAX_ROOM = 64
MAX_TEXT = 2000
HISTORY = 50

app = App()


class BadInput(ValueError):
    """A message the chat refuses; its text goes back to the client as ``error``."""


def answers(handler):
    """Run ``handler(sid, payload)``; a `BadInput` becomes the ack ``{ok: false, error}``."""

    @functools.wraps(handler)
    def wrapper(sid, *args):
        try:
            if len(args) != 1 or not isinstance(args[0], dict):
                raise BadInput("send one object as the payload, e.g. {\"text\": \"hi\"}")
            return handler(sid, args[0])
        except BadInput as exc:
            return {"ok": False, "error": str(exc)}
    return wrapper


def field(payload: dict, key: str, limit: int) -> str:
    value = payload.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise BadInput(f"{key} is required")
    if not isinstance(value, str):
        raise BadInput(f"{key} must be a string")
    if len(value.strip()) > limit:
        raise BadInput(f"{key} is longer than {limit} characters")
    return value.strip()


def channel(room: str) -> str:
    # the Socket.IO room of a chat room: every client's sid is a room too, and a chat room
    # named like someone's sid must not reach that client
    return "chat:" + room


def history_key(room: str) -> str:
    return app.key("history", room)


def members(room: str) -> list:
    """The names of the room's clients (one name once: a user may have two tabs open)."""
    names = (app.get_session(sid).get("name") for sid in app.room_members(channel(room)))
    return sorted({name for name in names if name})


def history(room: str) -> list:
    return [json.loads(raw) for raw in app.redis.lrange(history_key(room), 0, -1)]


def leave_current(sid: str, session: dict) -> None:
    """Take the client out of its room and tell the room; the caller saves the session."""
    room = session.pop("room", None)
    if room is None:
        return
    app.leave_room(sid, channel(room))
    app.emit("presence", {"room": room, "members": members(room), "left": session["name"]},
             to=channel(room))


@app.on("join")
@answers
def join(sid, payload):
    name = field(payload, "name", MAX_NAME)
    room = field(payload, "room", MAX_ROOM)
    session = app.get_session(sid)
    if session.get("room") != room:
        leave_current(sid, session)
    # the name is saved before entering, so `members` finds it
    app.save_session(sid, {"name": name, "room": room})
    app.enter_room(sid, channel(room))
    present = members(room)
    app.emit("presence", {"room": room, "members": present, "joined": name}, to=channel(room))
    return {"ok": True, "room": room, "members": present, "history": history(room)}


@app.on("say")
@answers
def say(sid, payload):
    text = payload.get("text")
    if not isinstance(text, str):
        raise BadInput("text is required" if text is None else "text must be a string")
    if not text.strip():
        raise BadInput("text is empty")
    if len(text) > MAX_TEXT:
        raise BadInput(f"text is longer than {MAX_TEXT} characters")
    session = app.get_session(sid)
    room = session.get("room")
    if room is None:
        raise BadInput("join a room first")
    message = {"id": uuid.uuid4().hex, "room": room, "name": session["name"], "text": text,
               "ts": int(time.time() * 1000)}
    # written with the message's finish, before the `said` goes out: no round trip here
    app.writes().rpush(history_key(room), json.dumps(message))
    app.writes().ltrim(history_key(room), -HISTORY, -1)
    app.emit("said", message, to=channel(room))
    return {"ok": True, "id": message["id"]}


@app.on("leave")
@answers
def leave(sid, payload):
    session = app.get_session(sid)
    if session.get("room") is None:
        raise BadInput("not in a room")
    leave_current(sid, session)
    app.save_session(sid, session)
    return {"ok": True}


@app.event
def disconnect(sid, reason=None):
    # the app-node forgets the client's session and rooms right after this handler
    leave_current(sid, app.get_session(sid))
