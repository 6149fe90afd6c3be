"""A Flask-SocketIO chat: sessions, rooms, a catch-all, a class-based namespace, a background
task started from a handler, acks both ways and a server-side disconnect.

tests/test_porting.py runs it on Flask-SocketIO in one process, and its port on a cluster:
this file with the module of its Flask-SocketIO import swapped for siocluster.flask_socketio,
nothing else, started with ``python -m siocluster.appnode <module>:socketio
--background-tasks cluster`` and ``python -m siocluster.pages <module>:app``.
"""

from threading import Lock

from flask import Flask, copy_current_request_context, render_template_string, request, session
from flask_socketio import (
    ConnectionRefusedError,
    Namespace,
    SocketIO,
    close_room,
    disconnect,
    emit,
    join_room,
    leave_room,
    rooms,
    send,
)

app = Flask(__name__)
app.config["SECRET_KEY"] = "a test's key, not a secret"
socketio = SocketIO(app)
ticker = None
ticker_lock = Lock()

PAGE = "<!doctype html><title>chat</title><p>Socket.IO runs in {{ mode }} mode</p>"


@app.route("/")
def index():
    return render_template_string(PAGE, mode=socketio.async_mode)


@app.route("/login/<name>")
def login(name):
    session["user"] = name           # Flask's cookie session: Socket.IO handlers start with it
    return "hello " + name


def tick(count, every):
    for n in range(1, count + 1):
        socketio.sleep(every)
        socketio.emit("tick", {"n": n})


@socketio.event
def connect(auth):
    name = (auth or {}).get("name") or session.get("user")
    if not name:
        raise ConnectionRefusedError("who are you?")
    session["name"] = name
    session["said"] = 0
    emit("welcome", {"name": name, "mode": socketio.async_mode})


@socketio.event
def join(room):
    join_room(room)
    session["room"] = room
    emit("joined", {"name": session["name"], "room": room}, to=room, include_self=False)
    return {"rooms": sorted(r for r in rooms() if r != request.sid),
            "own room": request.sid in rooms()}


@socketio.event
def leave(room):
    leave_room(room)
    session.pop("room", None)
    emit("left", {"name": session["name"], "room": room}, to=room)


@socketio.event
def say(text):
    session["said"] += 1
    emit("said", {"name": session["name"], "text": text, "n": session["said"]},
         to=session["room"])
    return session["said"]


@socketio.event
def shout(text):
    emit("shouted", {"name": session["name"], "text": text.upper()}, broadcast=True)


@socketio.event
def count():
    session["counted"] = session.get("counted", 0) + 1
    emit("counted", session["counted"])        # to the sender only


@socketio.on("message")
def on_message(text):
    send("you said: " + text)


@socketio.event
def divide(data):
    return data["a"] / data["b"]


@socketio.on_error_default
def on_error(exc):
    emit("failed", {"error": type(exc).__name__})
    return "failed"


@socketio.on("close room")
def on_close_room(room):
    emit("closing", {"room": room, "by": session["name"]}, to=room)
    close_room(room)


@socketio.event
def start_ticker(data):
    global ticker
    with ticker_lock:
        if ticker is None:
            ticker = socketio.start_background_task(tick, data["count"], data["every"])
    return "ticking"


@socketio.event
def goodbye():
    @copy_current_request_context
    def can_disconnect():
        disconnect()

    # the client's ack says it got the message: then it is safe to disconnect it
    emit("bye", {"name": session["name"]}, callback=can_disconnect)


@socketio.on("*")
def catch_all(event, data=None):
    emit("caught", {"event": event, "data": data, "event seen": request.event["message"]})
    return "caught " + event


@socketio.on("disconnect")
def on_disconnect(reason):
    if "room" in session:
        emit("gone", {"name": session["name"], "reason": reason}, to=session["room"],
             include_self=False)


class Echo(Namespace):
    # (Flask-SocketIO shares one session among a connection's namespaces, siocluster keeps
    # one per namespace, as python-socketio does: this one only uses keys of its own)
    def on_echo(self, data):
        session["echoes"] = session.get("echoes", 0) + 1
        emit("echoed", {"data": data, "namespace": request.namespace,
                        "echoes": session["echoes"]})
        return len(data)


socketio.on_namespace(Echo("/echo"))


if __name__ == "__main__":
    socketio.run(app)
