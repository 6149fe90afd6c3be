"""A small python-socketio chat on one server: the "before" of the worked example.

    python examples/moved_from_python_socketio/chat_before.py      # on 127.0.0.1:8000

chat_after.py is the same app moved to siocluster: only the line that makes ``sio`` and
the way it is run differ.
"""

if __name__ == "__main__":  # an entry point: patch before anything imports socket or ssl
    from gevent import monkey

    monkey.patch_all()

import socketio

sio = socketio.Server(async_mode="gevent", cors_allowed_origins="*")


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
    from gevent import pywsgi
    from geventwebsocket.handler import WebSocketHandler

    app = socketio.WSGIApp(sio)
    pywsgi.WSGIServer(("127.0.0.1", 8000), app, handler_class=WebSocketHandler).serve_forever()
