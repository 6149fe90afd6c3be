"""siocluster on a real Redis Cluster: 3 masters started by the test session
(`EmbeddedRedisCluster`), io-nodes and app-nodes in this process, real Socket.IO clients."""

import uuid

import gevent
import pytest
from redis.crc import key_slot

from siocluster import App, Config
from tests.conftest import Cluster
from tests.helpers import wait_until
from tests.test_recovery import (
    FAST_RECONNECT,
    Sender,
    come_back,
    drop_transport,
    numbers,
    room_app,
    wait_recovered,
)

pytestmark = pytest.mark.timeout(120)


def cluster_config(redis_cluster, **overrides):
    settings = dict(redis_url=redis_cluster.url, prefix=f"test-{uuid.uuid4().hex[:8]}",
                    pop_timeout=0.2, heartbeat_interval=0.3, node_ttl=1.5,
                    connect_timeout=3.0, call_timeout=3.0, workers=6, rate_limit=0)
    settings.update(overrides)
    return Config(**settings)


@pytest.fixture
def on_cluster(redis_cluster):
    cluster = Cluster(cluster_config(redis_cluster))
    yield cluster
    cluster.stop()


def counter_app():
    app = App()

    @app.on("join")
    def join(sid, room):
        app.enter_room(sid, room)
        return app.room_members(room)

    @app.on("shout")
    def shout(sid, room, text):
        app.emit("shouted", text, to=room)

    @app.on("count")
    def count(sid, n):
        with app.session(sid) as session:
            session["seen"] = session.get("seen", []) + [n]
        app.emit("counted", n, to=sid)

    return app


def test_shards_spread_over_the_masters(on_cluster, redis_cluster):
    keys = on_cluster.config.keys()
    assert len(keys.shards) == 3
    masters = {redis_cluster.master_of_slot(key_slot(shard.ready.encode()))
               for shard in keys.shards}
    assert len(masters) == 3


def test_chat_and_ordered_session_over_two_io_nodes(on_cluster):
    app = counter_app()
    io_a, io_b = on_cluster.io_node(), on_cluster.io_node()
    on_cluster.app_node(app)
    on_cluster.app_node(app)
    members = [on_cluster.client(io) for io in (io_a, io_b, io_a, io_b, io_a, io_b)]
    for member in members:
        member.call("join", "lobby")
    assert len(members[0].call("join", "lobby")[0]) == 6
    members[1].sio.emit("shout", ("lobby", "hello"))
    for member in members:
        member.expect("shouted")
    # a burst of 50 events from one client: handled one at a time, in order
    for n in range(50):
        members[2].sio.emit("count", n)
    members[2].expect("counted", count=50, timeout=20)
    assert [args[0] for args in members[2].received("counted")] == list(range(50))


def test_recovery_positions_span_the_shards(on_cluster):
    """A transport drop while a busy room talks, on 3 shards: the client comes back as
    itself and receives every message once, in order (its position names one offset per
    shard's stream)."""
    app, seen = room_app()
    io1, io2 = on_cluster.io_node(), on_cluster.io_node()
    on_cluster.app_node(app)
    on_cluster.app_node(app)
    listener = on_cluster.client(io1, **FAST_RECONNECT)
    senders = [on_cluster.client(io2) for _ in range(3)]   # most likely in several shards
    for client in (listener, *senders):
        assert client.call("join", "r") == ["joined"]
    sid = listener.sid
    talks = [Numbered(sender, "r", 100_000 * k) for k, sender in enumerate(senders)]
    wait_until(lambda: len(numbers(listener)) >= 30, timeout=10)
    for _ in range(2):
        before = len(numbers(listener))
        drop_transport(listener)
        wait_recovered(listener, sid)
        wait_until(lambda n=before + 30: len(numbers(listener)) >= n, timeout=10)
    # one more: away on one io-node, back on the other
    drop_transport(listener)
    listener.sio.disconnect()
    come_back(listener, io2)
    wait_recovered(listener, sid)
    sent = sum(talk.stop() for talk in talks)
    wait_until(lambda: len(numbers(listener)) >= sent, timeout=10,
               message=f"the listener has {len(numbers(listener))} of {sent}")
    got = numbers(listener)
    assert len(got) == sent                     # each once, each sender's in order
    for talk in talks:
        assert [n - talk.base for n in got if talk.base <= n < talk.base + 100_000] \
            == list(range(talk.sent))
    assert seen["disconnects"] == []


class Numbered(Sender):
    """A `Sender` whose numbers start at ``base``, to tell several apart."""

    def __init__(self, client, room, base):
        self.base = base
        super().__init__(client, room)

    def _run(self):
        while self.running:
            n = self.base + self.sent
            assert self.client.call("say", self.room, n) == [n]
            self.sent += 1
            gevent.sleep(0.005)
