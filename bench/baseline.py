"""A plain python-socketio server with the bench's handlers inline: the baselines.

One process is the no-cluster ceiling; with ``--redis-url`` the server uses
``socketio.RedisManager``, and two of them make what Python users run today to scale::

    python -m bench.baseline --port 9001
    python -m bench.baseline --port 9001 --redis-url redis://127.0.0.1:6390/0

It is python-socketio's documented gevent deployment: ``socketio.Server(async_mode=
'gevent')`` under gevent's WSGI server with gevent-websocket, default options.
"""

if __name__ == "__main__":  # an entry point: patch before anything imports socket
    from gevent import monkey

    monkey.patch_all()

import argparse
import signal

import gevent
import gevent.event
import socketio
from gevent import pywsgi
from geventwebsocket.handler import WebSocketHandler

from bench.apps import register
from bench.systems import raise_file_limit


def make_server(redis_url=None, channel="socketio"):
    # room for bursts in redis-py's pool (its default, 100, fails RedisManager's publishes
    # under overload and drops its subscription: bench/chat_baseline.py says more)
    manager = socketio.RedisManager(redis_url, channel=channel,
                                    redis_options={"max_connections": 1000}) \
        if redis_url else None
    return register(socketio.Server(async_mode="gevent", client_manager=manager))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline",
                                     description="python-socketio with the bench's handlers")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", help="use socketio.RedisManager on this Redis")
    parser.add_argument("--channel", default="socketio", help="RedisManager's channel")
    args = parser.parse_args(argv)
    serve(make_server(args.redis_url, args.channel), args.host, args.port)


def serve(sio: socketio.Server, host: str, port: int) -> None:
    """Serve ``sio`` under gevent's WSGI server with gevent-websocket until SIGTERM."""
    raise_file_limit()
    server = pywsgi.WSGIServer((host, port), socketio.WSGIApp(sio),
                               handler_class=WebSocketHandler, log=None)
    server.start()
    print(f"listening on {host}:{port}", flush=True)
    shutdown = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, shutdown.set)
    gevent.signal_handler(signal.SIGINT, shutdown.set)
    shutdown.wait()
    server.stop(timeout=1)


if __name__ == "__main__":
    main()
