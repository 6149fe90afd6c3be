"""The Redis under a cluster started by `siocluster.cluster`: a ``redis-server`` of its own, or
one given with ``--redis-url`` that is checked before any node starts.

The runner spawns, watches and stops the embedded ``redis-server`` as it does its nodes (its
lines show as ``redis | ...``); this module says how to start it, waits until it answers
and removes its data. Every failure is a SystemExit saying what to do.
"""

import shutil
import tempfile
import time
from typing import Callable

from .connection import make_redis, parse_redis_url
from .errors import ConfigError
from .net import free_port

START_TIMEOUT = 10.0    # seconds a new redis-server has to answer


class EmbeddedRedis:
    """A ``redis-server`` on a free port of 127.0.0.1 that saves nothing, its directory a
    temporary one: run `args`, then `wait_ready`; `remove` once it has stopped."""

    def __init__(self):
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server is not installed: run `make install` (it installs "
                             "it), or `apt-get install redis-server`, or point the cluster at "
                             "a running Redis with --redis-url (REDIS_URL=... for make)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="siocluster-redis-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", self.dir, "--protected-mode", "no"]

    def wait_ready(self, alive: Callable[[], bool]) -> None:
        """Return once it answers a ping; ``alive()`` tells whether its process still runs."""
        client = make_redis(self.url, {"socket_connect_timeout": 0.5})
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                client.ping()
                break
            except Exception as exc:  # OSError, or redis-py's ConnectionError while it starts
                error = exc
            if not alive():
                raise SystemExit("redis-server exited at start; its lines above say why")
            if time.monotonic() > deadline:
                raise SystemExit(f"redis-server did not answer in {START_TIMEOUT}s: {error}")
            time.sleep(0.05)
        client.close()

    def remove(self) -> None:
        """Delete its data directory."""
        shutil.rmtree(self.dir, ignore_errors=True)


def check_redis(url: str) -> None:
    """Make sure the Redis at ``url`` answers before any node is started on it."""
    try:
        parse_redis_url(url)
        client = make_redis(url)
        client.ping()
        client.close()
    except ConfigError as exc:
        raise SystemExit(str(exc))
    except Exception as exc:
        raise SystemExit(f"cannot reach Redis at {url.split('@')[-1]}: {exc}. "
                         "Start it, fix --redis-url (REDIS_URL=... for make), or leave it "
                         "out to use an embedded redis-server.")
