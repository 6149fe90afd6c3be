"""The tests' real Redis Cluster (`siocluster.embedded.EmbeddedRedisCluster`): it serves every
slot from its masters to redis-py's own cluster client, and a replica takes over a killed
master with the writes it had acknowledged.
"""

import pytest
import redis
from redis.cluster import RedisCluster

SLOTS = 16384


def slot_ranges(port):
    """CLUSTER SLOTS of the node on ``port``: ``[(start, end, master port)]``."""
    node = redis.Redis(host="127.0.0.1", port=port)
    try:
        return [(start, end, master[1]) for start, end, master, *_ in
                node.execute_command("CLUSTER", "SLOTS")]
    finally:
        node.close()


@pytest.mark.timeout(60)
def test_every_slot_is_served_and_keys_land_on_different_masters(redis_cluster):
    assert len(redis_cluster.masters()) == 3
    assert redis_cluster.url == "redis+cluster://" + ",".join(
        f"127.0.0.1:{port}" for port in redis_cluster.seeds)
    for port in redis_cluster.ports:
        ranges = slot_ranges(port)
        assert sum(end - start + 1 for start, end, _ in ranges) == SLOTS
        assert {master for _, _, master in ranges} == set(redis_cluster.masters())

    client = RedisCluster(host="127.0.0.1", port=redis_cluster.seeds[0], decode_responses=True)
    owners = {}
    try:
        for tag in "abcdefgh":
            key = f"{{{tag}}}:harness"
            assert client.set(key, tag)
            assert client.get(key) == tag
            owners[key] = redis_cluster.master_of_slot(client.keyslot(key))
    finally:
        client.close()
    assert len(set(owners.values())) > 1, owners
    for key, port in owners.items():        # each key is where the cluster says it is
        master = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
        assert master.get(key) == key[1]
        master.close()


@pytest.mark.timeout(90)
def test_a_replica_takes_over_a_killed_master_with_its_writes(redis_cluster_replicated):
    harness = redis_cluster_replicated
    key = "{failover}:harness"
    seed = RedisCluster(host="127.0.0.1", port=harness.seeds[0], decode_responses=True)
    slot = seed.keyslot(key)
    seed.close()
    old = harness.master_of_slot(slot)
    master = redis.Redis(host="127.0.0.1", port=old, decode_responses=True)
    assert master.set(key, "kept")
    assert master.execute_command("WAIT", 1, 1000) == 1     # the replica has it
    master.close()

    harness.kill(old)
    new = harness.wait_failover(old)
    assert new != old and new in harness.masters() and old not in harness.masters()
    assert harness.master_of_slot(slot) == new

    survivor = next(port for port in harness.seeds if port != old)
    client = RedisCluster(host="127.0.0.1", port=survivor, decode_responses=True)
    try:
        assert client.get(key) == "kept"
        assert client.set(key, "written after")
        assert client.get(key) == "written after"
    finally:
        client.close()
