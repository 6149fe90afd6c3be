"""An io-node that also serves a WSGI app's pages: what ``socketio.WSGIApp(sio, app)`` or
``socketio.run(app)`` did in one process, on a cluster.

    python -m siocluster.pages chat:app --port 8081      # chat.py's Flask app, and Socket.IO
    python -m siocluster.pages chat:app --port 8082      # as many as you like
    python -m siocluster.appnode chat:sio                # the handlers, on app-nodes

``/socket.io/`` is the io-node's; every other path goes to the app (a Flask app), so a page
that connects with ``io()`` (to its own origin) reaches an io-node. Its routes may emit or
start background tasks with the application's ``App`` (or Flask-SocketIO's ``SocketIO`` from
`siocluster.flask_socketio`): each one found in the app's module gets an `AppNode` for
sending, not started (it runs no handlers; app-nodes do).
"""

if __name__ == "__main__":  # an entry point: patch before anything imports socket or ssl
    from gevent import monkey

    monkey.patch_all()

from types import ModuleType
from typing import List, Optional

from .app import App
from .appnode import AppNode
from .loader import as_app, import_entry, wrong_server
from .seed import IoListener
from .tasks import check_mode


def apps_of(module: ModuleType, wsgi_app) -> List[App]:
    """The `App`s a page's routes may send with: the module's (an App, a SocketIO, a Flask
    app given one) and the one ``socketio.WSGIApp(sio, ...)`` wraps, if any."""
    found: List[App] = []
    candidates = [wsgi_app, getattr(getattr(wsgi_app, "wsgi_app", None), "engineio_app", None),
                  *vars(module).values()]
    for value in candidates:
        try:
            app = as_app(value)
        except RuntimeError:
            continue        # a proxy such as flask.request, outside a request
        if app is not None and all(app is not other for other in found):
            found.append(app)
    return found


def pages_node(wsgi_app, config=None, module: Optional[ModuleType] = None,
               background_tasks: Optional[str] = None) -> IoListener:
    """An io-node (not started) serving ``wsgi_app`` beside Socket.IO, each `App` of
    ``module`` (and the one ``wsgi_app`` wraps) given an `AppNode` to send with."""
    if as_app(wsgi_app) is not None and not callable(getattr(wsgi_app, "wsgi_app", None)):
        raise TypeError("give the WSGI app (the Flask app) whose pages to serve, not the "
                        "siocluster App: app-nodes run that (python -m siocluster.appnode)")
    for name, value in vars(module or ModuleType("none")).items():
        if not isinstance(value, ModuleType) and wrong_server(value):
            raise TypeError(f"{name}{wrong_server(value)}: its routes would emit to nobody")
    node = IoListener(config, wsgi_app=wsgi_app)
    for app in apps_of(module or ModuleType("none"), wsgi_app):
        if background_tasks is not None:
            app.background_tasks = check_mode(background_tasks)
        if app.node is None:
            AppNode(app, node.config)
    return node


def main(argv=None) -> None:
    import argparse
    import logging

    from redis.exceptions import RedisError

    from . import logs
    from .config import Config, ConfigError
    from .connection import start_failure
    from .entry import catch_signals, listen_error

    parser = argparse.ArgumentParser(
        prog="python -m siocluster.pages",
        description="Run an io-node that also serves a WSGI app's pages (a Flask app) on "
                    "its port: Socket.IO on /socket.io/, the app everywhere else.")
    parser.add_argument("app", help="the WSGI app, as package.module:attr (attr: app)")
    parser.add_argument("--background-tasks", choices=("node", "cluster"), default=None,
                        help="what the routes' start_background_task does: run the task in "
                             "this process (node, the default) or once per cluster (cluster)")
    config, args = Config.load(argv, parser=parser, role="io-node")
    logs.setup(config, "io-node")
    module, attr = import_entry(args.app, "pages")
    wsgi_app = getattr(module, attr or "app", None)
    if not callable(wsgi_app):
        raise SystemExit(f"pages: {args.app!r} is not a WSGI app (found "
                         f"{type(wsgi_app).__name__})")
    try:
        node = pages_node(wsgi_app, config, module, args.background_tasks)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"pages: {exc}")
    except (RuntimeError, RedisError) as exc:   # Redis unreachable or refusing: says what to do
        raise SystemExit(f"pages: {start_failure(exc, config.effective_redis_url)}")
    logs.identify(node.id)
    try:
        node.check_redis()
        node.start_server()
    except (RuntimeError, RedisError) as exc:
        raise SystemExit(f"pages: {start_failure(exc, config.effective_redis_url)}")
    except ConfigError as exc:
        raise SystemExit(f"pages: {exc}")
    except OSError as exc:
        raise SystemExit(listen_error("pages", exc, config.http_host, config.http_port))
    shutdown = catch_signals()      # from here on a signal stops the node gracefully
    node.start()
    logging.getLogger("siocluster").info("io-node %s serving %s and Socket.IO on %s:%s",
                                         node.id, args.app, *node.address[:2])
    node.run_until_signalled("stopping", shutdown)


if __name__ == "__main__":
    # the canonical module's main, not this __main__ copy (see siocluster.appnode)
    from siocluster.pages import main as _main

    _main()
