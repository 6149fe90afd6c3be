"""WSGI entry point for gunicorn: an io-node configured from ``SIOCLUSTER_*`` variables.

    SIOCLUSTER_REDIS_URL=redis://localhost:6379/0 SIOCLUSTER_HTTP_PORT=8081 \\
    gunicorn -k geventwebsocket.gunicorn.workers.GeventWebSocketWorker -w 1 \\
        -b 0.0.0.0:8081 siocluster.wsgi:application

gunicorn's gevent worker patches the standard library before it loads the application.
Set ``SIOCLUSTER_HTTP_PORT`` (and ``SIOCLUSTER_PUBLIC_HOST``) to the address browsers use,
since the io-node advertises it in the registry the frontend-node lists. One worker per
io-node: each worker would be an io-node of its own, with clients the others cannot see.

gunicorn's own server listens here, so ``MAX_CONNECTIONS``, ``MAX_CONNECTIONS_PER_ADDRESS``
and the request part of ``HANDSHAKE_TIMEOUT`` (`siocluster.listener`) do not apply: bound
connections with ``--worker-connections``. For TLS give gunicorn ``--certfile`` and
``--keyfile``, and set ``SIOCLUSTER_CERTFILE`` to the same file so that the io-node
advertises itself as TLS (``"tls": true`` in the registry); the files are gunicorn's to load.
"""

import atexit


def create_application(environ=None):
    """Build and start an io-node from the environment; returns it (a WSGI app)."""
    from . import logs
    from .config import Config
    from .ionode import IoNode

    config = Config.from_env(environ)
    logs.setup(config, "io-node")
    node = IoNode(config)
    logs.identify(node.id)
    node.start()
    atexit.register(node.stop, 5.0)
    node.freeze_startup_objects()     # gunicorn serves it next: no run_until_signalled here
    return node


def __getattr__(name):
    # made on first use, so that importing this module starts nothing
    if name == "application":
        globals()["application"] = app = create_application()
        return app
    raise AttributeError(name)
