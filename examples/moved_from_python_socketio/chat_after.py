"""The chat of chat_before.py moved to siocluster: the "after" of the worked example.

The handlers are the same lines; ``sio`` is a `siocluster.App` instead of a
``socketio.Server``, and the app runs as app-nodes beside io-nodes, all sharing one Redis
(from the repository's top directory)::

    python -m siocluster.ionode --port 8081 --redis-url redis://127.0.0.1:6379/0
    python -m siocluster.ionode --port 8082 --redis-url redis://127.0.0.1:6379/0
    python -m siocluster.appnode examples.moved_from_python_socketio.chat_after:sio \\
        --redis-url redis://127.0.0.1:6379/0

Clients connect to either io-node. To try it in one process instead::

    python examples/moved_from_python_socketio/chat_after.py --redis-url redis://...  # :8000
"""

if __name__ == "__main__":  # an entry point: patch before anything imports socket or ssl
    from gevent import monkey

    monkey.patch_all()

import socketio

import siocluster

sio = siocluster.App()


@sio.event
def connect(sid, environ, auth):
    name = (auth or {}).get("name")
    if not name:
        raise socketio.exceptions.ConnectionRefusedError(
            "tell us your name: connect with auth={'name': ...}")
    sio.save_session(sid, {"name": name})


@sio.event
def join(sid, room):
    sio.enter_room(sid, room)
    with sio.session(sid) as session:
        session["room"] = room
    sio.emit("joined", {"name": session["name"]}, to=room, skip_sid=sid)
    return {"room": room, "you": session["name"]}


@sio.event
def say(sid, text):
    session = sio.get_session(sid)
    sio.emit("said", {"name": session["name"], "text": text}, to=session["room"])
    return "ok"


@sio.event
def count(sid):
    # a per-client counter in the session, as in Flask-SocketIO's example app
    with sio.session(sid) as session:
        session["count"] = session.get("count", 0) + 1
        return session["count"]


@sio.event
def disconnect(sid, reason):
    session = sio.get_session(sid)
    if "room" in session:
        sio.emit("left", {"name": session["name"]}, to=session["room"], skip_sid=sid)


if __name__ == "__main__":
    # a one-process try-out: an io-node and an app-node side by side; the flags of
    # `python -m siocluster.ionode` apply (--redis-url, --port, ...)
    config, _ = siocluster.Config.load(http_port=8000)
    siocluster.AppNode(sio, config).start()
    siocluster.IoNode(config).start().serve()
