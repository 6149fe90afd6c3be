"""siocluster on a real Redis Cluster: 3 masters started by the test session
(`EmbeddedRedisCluster`), io-nodes and app-nodes in this process, real Socket.IO clients."""

import uuid

import pytest
from redis.crc import key_slot

from siocluster import App, Config
from tests.conftest import Cluster

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
