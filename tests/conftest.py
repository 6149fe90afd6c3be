"""Fixtures: a private redis-server for the session, real nodes started in-process, and real
Redis Clusters.

gevent patches the standard library here, before the tests import anything that opens a
socket, the way every siocluster entry point does.
"""

from gevent import monkey

monkey.patch_all()

import os
import shutil
import subprocess
import tempfile
import time
import uuid

import pytest
import redis

from siocluster import AppNode, Config, IoNode
from siocluster.embedded import EmbeddedRedisCluster
from tests.helpers import EventClient, free_port, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RedisServer:
    """A redis-server of the test session's own, on a free loopback port."""

    def __init__(self, port=None, extra_args=()):
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.exit("redis-server is not installed: run `make test` (it installs it) or "
                        "`apt-get install redis-server`", returncode=3)
        self.exe = exe
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.dir = tempfile.mkdtemp(prefix="siocluster-redis-")
        self.proc = None

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--protected-mode", "no",
             *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        try:
            wait_until(lambda: self._ping(client), timeout=10,
                       message="redis-server did not start")
        finally:
            client.close()
        return self

    def _ping(self, client):
        try:
            return client.ping()
        except redis.exceptions.AuthenticationError:
            return True
        except redis.exceptions.ResponseError:
            return True     # NOAUTH: up, but wants a password
        except redis.exceptions.ConnectionError:
            assert self.proc.poll() is None, "redis-server exited at start"
            return False

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
def durable_redis():
    """A redis-server of the test's own that keeps every write across a restart."""
    server = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"]).start()
    yield server
    server.kill()
    shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
def config(redis_server):
    """A config of a cluster of its own (its own key prefix), with short timeouts."""
    return Config(redis_url=redis_server.url, prefix=f"test-{uuid.uuid4().hex[:8]}",
                  pop_timeout=0.2, heartbeat_interval=0.3, node_ttl=1.5, connect_timeout=3.0,
                  call_timeout=3.0, workers=4, rate_limit=0)


@pytest.fixture
def redis_client(config):
    return config.redis_client()


class Cluster:
    """Real io-nodes (listening on loopback) and app-nodes in this process."""

    def __init__(self, config):
        self.config = config
        self.io_nodes = []
        self.app_nodes = []
        self.clients = []

    def io_node(self, **overrides):
        node = IoNode(self.config.replace(**overrides) if overrides else self.config)
        node.start()
        node.start_server(("127.0.0.1", 0))
        self.io_nodes.append(node)
        return node

    def app_node(self, app, **overrides):
        node = AppNode(app, self.config.replace(**overrides) if overrides else self.config)
        node.start()
        self.app_nodes.append(node)
        return node

    def client(self, io_node, transport="websocket", namespaces=None, auth=None, connect=True,
               **kwargs):
        client = EventClient(**kwargs)
        self.clients.append(client)
        if connect:
            client.connect_to(io_node, transport=transport, namespaces=namespaces, auth=auth)
        return client

    def stop(self):
        for client in self.clients:
            client.close()
        for node in self.app_nodes + self.io_nodes:
            node.stop(timeout=3)
            node.redis.close()


@pytest.fixture
def own_cluster(durable_redis):
    """A cluster on a Redis of its own, which a test may stop and start again."""
    config = Config(redis_url=durable_redis.url, prefix=f"test-{uuid.uuid4().hex[:8]}",
                    pop_timeout=0.2, heartbeat_interval=0.3, node_ttl=1.5, connect_timeout=3.0,
                    call_timeout=3.0, workers=2, rate_limit=0)
    cluster = Cluster(config)
    yield cluster
    cluster.stop()


@pytest.fixture
def node_env(config):
    """The environment of a node run as its users run it, in this test's cluster."""
    return dict(os.environ, PYTHONPATH=ROOT, SIOCLUSTER_REDIS_URL=config.redis_url,
                SIOCLUSTER_PREFIX=config.prefix, SIOCLUSTER_HEARTBEAT_INTERVAL="0.3",
                SIOCLUSTER_NODE_TTL="1.5")


@pytest.fixture
def cluster(config):
    cluster = Cluster(config)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_cluster():
    """A real Redis Cluster of the session's own: 3 masters, no replica."""
    redis_cluster = EmbeddedRedisCluster(masters=3, replicas=0).start()
    yield redis_cluster
    redis_cluster.stop()


@pytest.fixture
def redis_cluster_replicated():
    """A real Redis Cluster of the test's own whose masters may be killed: 3 masters with a
    replica each, a master taken for failed after 1.5s."""
    redis_cluster = EmbeddedRedisCluster(masters=3, replicas=1, node_timeout_ms=1500).start()
    yield redis_cluster
    redis_cluster.stop()


def pytest_report_header(config):
    return f"redis-server: {shutil.which('redis-server')}; pid {os.getpid()}; {time.ctime()}"
