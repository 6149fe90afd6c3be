"""The example chat's protocol on plain python-socketio with ``RedisManager``: what a Python
developer would write to scale the chat without siocluster (the bench's chat scenario)::

    python -m bench.chat_baseline --port 9001 --redis-url redis://127.0.0.1:6390/0
    python -m bench.chat_baseline --port 9002 --redis-url redis://127.0.0.1:6390/0

The protocol is example_chat/app.py's, on namespace ``/``:

- ``join {name, room}`` -> ``{ok: true, room, members, history}``; the room gets
  ``presence {room, members, joined: name}`` (a client in another room leaves it first).
- ``say {text}`` -> ``{ok: true, id}``; the room, sender included, gets
  ``said {id, room, name, text, ts}`` (``ts`` in milliseconds since the epoch).
- ``leave {}`` -> ``{ok: true}``; the room gets ``presence {room, members, left: name}``; a
  disconnect does the same.
- Anything malformed -> ``{ok: false, error: "<reason>"}``, and nothing changes.

Idiomatic python-socketio: ``socketio.Server(async_mode='gevent', client_manager=
socketio.RedisManager(url))`` under gevent's WSGI server with gevent-websocket, a client's
name and room in its python-socketio session (kept by the process the client is connected
to), the room's last 50 messages in the same capped Redis list as the example chat. The one
thing RedisManager cannot do is list a room's members across processes (``rooms`` and
``get_participants`` only see this process's clients), so each room's members are also in a
Redis hash, sid -> name, written on join and removed on leave and disconnect. redis-py's
connection pools get room for bursts of events (`create_server` says why).
"""

if __name__ == "__main__":  # an entry point: patch before anything imports socket
    from gevent import monkey

    monkey.patch_all()

import argparse
import json
import time
import uuid

import redis
import socketio

# the protocol's input rules, written once: the example chat's own
from example_chat.app import (
    HISTORY,
    MAX_NAME,
    MAX_ROOM,
    MAX_TEXT,
    BadInput,
    answers,
    channel,
    field,
)


def create_server(redis_url: str, channel_name: str = "socketio",
                  prefix: str = "chat") -> socketio.Server:
    """The chat on a ``socketio.Server`` whose processes share ``redis_url``."""
    # python-socketio handles each event in a greenlet of its own, so a burst of events (a
    # crowd joining, or leaving) wants more Redis connections at once than redis-py 8's
    # default pool allows (100, then MaxConnectionsError). RedisManager then logs "Cannot
    # publish to redis... retrying", connects again and drops its subscription for a second
    # or more ("Cannot receive from redis"), losing what was published meanwhile: its pool
    # gets more room, and the chat's own commands wait for a connection instead of failing.
    manager = socketio.RedisManager(redis_url, channel=channel_name,
                                    redis_options={"max_connections": 1000})
    sio = socketio.Server(async_mode="gevent", client_manager=manager)
    db = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
        redis_url, decode_responses=True, max_connections=100, timeout=20))

    def history_key(room: str) -> str:
        return f"{prefix}:app:history:{room}"

    def members_key(room: str) -> str:
        return f"{prefix}:app:members:{room}"

    def members(room: str) -> list:
        """The names of the room's clients (one name once: a user may have two tabs open)."""
        return sorted(set(db.hvals(members_key(room))))

    def history(room: str) -> list:
        return [json.loads(raw) for raw in db.lrange(history_key(room), 0, -1)]

    def leave_current(sid: str, session: dict) -> None:
        """Take the client out of its room and tell the room; the caller saves the session."""
        room = session.pop("room", None)
        if room is None:
            return
        sio.leave_room(sid, channel(room))
        db.hdel(members_key(room), sid)
        sio.emit("presence", {"room": room, "members": members(room), "left": session["name"]},
                 to=channel(room))

    @sio.on("join")
    @answers
    def join(sid, payload):
        name = field(payload, "name", MAX_NAME)
        room = field(payload, "room", MAX_ROOM)
        with sio.session(sid) as session:
            if session.get("room") != room:
                leave_current(sid, session)
            session.update(name=name, room=room)
        sio.enter_room(sid, channel(room))
        db.hset(members_key(room), sid, name)
        present = members(room)
        sio.emit("presence", {"room": room, "members": present, "joined": name},
                 to=channel(room))
        return {"ok": True, "room": room, "members": present, "history": history(room)}

    @sio.on("say")
    @answers
    def say(sid, payload):
        text = payload.get("text")
        if not isinstance(text, str):
            raise BadInput("text is required" if text is None else "text must be a string")
        if not text.strip():
            raise BadInput("text is empty")
        if len(text) > MAX_TEXT:
            raise BadInput(f"text is longer than {MAX_TEXT} characters")
        session = sio.get_session(sid)
        room = session.get("room")
        if room is None:
            raise BadInput("join a room first")
        message = {"id": uuid.uuid4().hex, "room": room, "name": session["name"], "text": text,
                   "ts": int(time.time() * 1000)}
        pipe = db.pipeline()
        pipe.rpush(history_key(room), json.dumps(message))
        pipe.ltrim(history_key(room), -HISTORY, -1)
        pipe.execute()
        sio.emit("said", message, to=channel(room))
        return {"ok": True, "id": message["id"]}

    @sio.on("leave")
    @answers
    def leave(sid, payload):
        with sio.session(sid) as session:
            if session.get("room") is None:
                raise BadInput("not in a room")
            leave_current(sid, session)
        return {"ok": True}

    @sio.event
    def disconnect(sid, reason=None):
        with sio.session(sid) as session:
            leave_current(sid, session)

    return sio


def main(argv=None) -> None:
    from bench.baseline import serve

    parser = argparse.ArgumentParser(prog="python -m bench.chat_baseline",
                                     description="the example chat on python-socketio with "
                                                 "RedisManager")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True, help="the Redis every process shares")
    parser.add_argument("--channel", default="socketio", help="RedisManager's channel")
    parser.add_argument("--prefix", default="chat", help="prefix of the chat's Redis keys")
    args = parser.parse_args(argv)
    serve(create_server(args.redis_url, args.channel, args.prefix), args.host, args.port)


if __name__ == "__main__":
    main()
