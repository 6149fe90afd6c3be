"""The chat's frontend-node: the page at ``/`` plus siocluster's ``/config.js``.

    python -m example_chat.frontend --port 8080 --redis-url redis://localhost:6379/0

Every ``siocluster`` setting is a flag (``--prefix``, ``--io-servers``, ...) or a
``SIOCLUSTER_*`` variable. Without ``--io-servers`` the page is told the io-nodes alive
right now, from the cluster's Redis. To put the chat on a site of your own, register
`create_app`'s pieces there: the page, and ``siocluster.make_blueprint(config)``.
"""

if __name__ == "__main__":  # an entry point: patch before anything imports socket or ssl
    from gevent import monkey

    monkey.patch_all()

import argparse
import logging

from flask import Flask, render_template

from siocluster import Config, logs, make_frontend_server
from siocluster.entry import listen_error, wait_for_signal

logger = logging.getLogger("example_chat.frontend")


def create_app(config=None) -> Flask:
    """The chat's Flask app: ``/``, ``/static/chat.js`` and the siocluster blueprint.

    :param config: a `siocluster.Config` or a mapping of its keys; None reads the
        ``SIOCLUSTER_*`` keys of the Flask config.
    """
    app = Flask(__name__)

    @app.get("/")
    def index():
        return render_template("index.html")

    return make_frontend_server(app, config)


def main(argv=None) -> None:
    from gevent.pywsgi import WSGIServer

    parser = argparse.ArgumentParser(prog="python -m example_chat.frontend",
                                     description="Serve the chat's page and the io-node list.")
    config, _ = Config.load(argv, parser=parser, role="frontend-node")
    logs.setup(config, "frontend-node")
    logs.identify(config.node_id or "frontend-node")
    server = WSGIServer((config.http_host, config.http_port), create_app(config),
                        log=logging.getLogger("example_chat.frontend.access"))
    try:
        server.start()
    except OSError as exc:
        raise SystemExit(listen_error("frontend-node", exc, config.http_host, config.http_port))
    host, port = server.address[:2]
    logger.info("frontend-node listening on http://%s:%s/", host, port)

    wait_for_signal()
    logger.info("frontend-node stopping")
    server.stop(timeout=5)


if __name__ == "__main__":
    # the canonical module's main, so Flask finds the templates by the package's name
    from example_chat.frontend import main as _main

    _main()
