"""What every entry point shares: waiting for SIGTERM or SIGINT, and saying why it could not
listen. The entry points themselves (`python -m siocluster.ionode`, ``policy_server.py``,
...) patch gevent first; this module only runs inside them."""

import errno
import signal

import gevent
import gevent.event


def catch_signals() -> gevent.event.Event:
    """From now on SIGTERM and SIGINT set the returned event instead of killing the process.
    An entry point calls this before its node registers in Redis and passes the event to
    `wait_for_signal`: a signal in between then stops the node gracefully (deregistered)
    once it has started, where before it killed it registered."""
    shutdown = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, shutdown.set)
    gevent.signal_handler(signal.SIGINT, shutdown.set)
    return shutdown


def wait_for_signal(shutdown=None) -> None:
    """Block until SIGTERM or SIGINT; the caller then stops what it runs, gracefully.
    ``shutdown``: the event of an earlier `catch_signals()`, so that a signal since then
    counts too."""
    (catch_signals() if shutdown is None else shutdown).wait()


def listen_error(who: str, exc: OSError, host: str, port: int, hint: str = "") -> str:
    """What to tell the user when ``who`` cannot listen on ``host:port``."""
    if exc.errno == errno.EACCES:
        return (f"{who}: port {port} is privileged: listening on it needs root or the "
                "CAP_NET_BIND_SERVICE capability (systemd: AmbientCapabilities="
                f"CAP_NET_BIND_SERVICE). Or choose a port above 1023 with --port{hint}.")
    if exc.errno == errno.EADDRINUSE:
        return (f"{who}: {host}:{port} is already in use; stop what uses it or choose "
                "another port with --port.")
    return f"{who}: cannot listen on {host}:{port}: {exc.strerror or exc}; check --host and --port."
