"""The benchmark's handlers, written once and registered on every system measured.

`register` takes anything with python-socketio's server API (``on``, ``emit``,
``enter_room``): a ``socketio.Server`` for the baselines, a `siocluster.App` for the
cluster (``python -m siocluster.appnode bench.apps:app``). So every system runs the very
same handler code.
"""

from siocluster import App


def register(server):
    """Add the three handlers the load generator uses to ``server``."""

    @server.on("echo")
    def echo(sid, data):
        return data

    @server.on("join")
    def join(sid, room):
        server.enter_room(sid, room)
        return True

    @server.on("chat")
    def chat(sid, message):
        # every member, the sender too: a chat shows your own line when the room has it
        server.emit("chat", message, to=message["room"])

    return server


app = register(App())
