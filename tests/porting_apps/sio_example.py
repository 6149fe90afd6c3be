"""A python-socketio server with a Flask app, in the style of python-socketio's examples: the
pages and Socket.IO share a port through socketio.WSGIApp, a route starts a background task,
handlers take sids and use sio's rooms, and one disconnects its client.

tests/test_porting.py runs it on python-socketio in one process, and its port on a cluster:
this file with `sio = socketio.Server(...)` made by siocluster instead (its two lines, nothing
else), served by `python -m siocluster.pages <module>:app` and `python -m siocluster.appnode
<module>:sio`.
"""

import socketio
from flask import Flask, render_template_string

sio = socketio.Server(async_mode="gevent")
app = Flask(__name__)
app.wsgi_app = socketio.WSGIApp(sio, app.wsgi_app)
thread = None


def background_thread(count, every):
    for n in range(1, count + 1):
        sio.sleep(every)
        sio.emit("my_response", {"data": "Server generated event", "count": n})


@app.route("/")
def index():
    global thread
    if thread is None:
        thread = sio.start_background_task(background_thread, 3, 0.2)
    return render_template_string("<p>async_mode: {{ mode }}</p>", mode=sio.async_mode)


@sio.event
def connect(sid, environ, auth):
    sio.emit("my_response", {"data": "Connected", "count": 0}, room=sid)


@sio.event
def my_event(sid, message):
    sio.emit("my_response", {"data": message["data"]}, room=sid)


@sio.event
def my_broadcast_event(sid, message):
    sio.emit("my_response", {"data": message["data"]})


@sio.event
def join(sid, message):
    sio.enter_room(sid, message["room"])
    sio.emit("my_response", {"data": "Entered room: " + message["room"]}, room=sid)


@sio.event
def leave(sid, message):
    sio.leave_room(sid, message["room"])
    sio.emit("my_response", {"data": "Left room: " + message["room"]}, room=sid)


@sio.event
def close_room(sid, message):
    sio.emit("my_response", {"data": "Room " + message["room"] + " is closing."},
             room=message["room"])
    sio.close_room(message["room"])


@sio.event
def my_room_event(sid, message):
    sio.emit("my_response", {"data": message["data"]}, room=message["room"])
    return "sent to " + message["room"]


@sio.event
def disconnect_request(sid):
    sio.disconnect(sid)


@sio.event
def disconnect(sid, reason):
    sio.emit("my_response", {"data": "Someone left: " + reason}, skip_sid=sid)


if __name__ == "__main__":
    from gevent import pywsgi
    from geventwebsocket.handler import WebSocketHandler

    pywsgi.WSGIServer(("", 5000), app, handler_class=WebSocketHandler).serve_forever()
