"""The fast message path keeps the delivery guarantees: app-nodes take waiting clients in
batches (each with up to 16 of its messages), io-nodes push by script sha.

Messages are put in the clients' queues before the app-node starts, so its workers find a
backlog and take several at a time; the commands they wrote are read back from the command
stream.
"""

import json

import gevent
import gevent.event

from siocluster import App
from siocluster.envelope import Envelope, decode_batch, unpack_args
from siocluster.lanes import PER_CLIENT, TAKE_MORE
from siocluster.state import Keys
from tests.helpers import enqueue, inbox_messages, inbox_of, wait_until


def event(sid, name, *args):
    return Envelope("event", "/", sid, "io-node-x", {"sid": sid}, event=name, args=list(args))


def fill_inbox(redis_client, keys, messages):
    # one push each, in order, as they arrive: each client's first message puts its token
    # in the ready list, so the client of the first message is taken first
    inbox = inbox_of(redis_client, keys)     # one: each holds a connection of its own
    for message in messages:
        inbox.push([(message.kind, message.sid, message.encode())])


def said(redis_client, keys):
    """The data of every `said` emit in the stream every io-node reads, in stream order,
    and how many stream entries carried them."""
    entries = redis_client.xrange(keys.commands)
    data = [unpack_args(command)[0] for _, fields in entries
            for command in decode_batch(fields["b"]) if command.get("event") == "said"]
    return data, len(entries)


def test_a_batch_keeps_order_and_a_failing_handler_retries_only_its_own_message(
        cluster, config, redis_client):
    keys = Keys(config.prefix)
    app, deliveries = App(), {}
    clients = 3

    @app.on("say")
    def say(sid, n):
        deliveries.setdefault(n, []).append(app.delivery())
        app.emit("said", n, to="room")
        if n == 7:
            raise ValueError("seven fails")    # after its emit: that emit must be dropped

    # a take's worth of messages of each client (client n % 3), interleaved as they arrive
    messages = [event(f"c{n % clients}", "say", n) for n in range(clients * PER_CLIENT)]
    fill_inbox(redis_client, keys, messages)
    node = cluster.app_node(app, workers=1, max_attempts=2)
    wait_until(lambda: redis_client.llen(keys.dead) == 1, timeout=10,
               message="the failing message was not dead-lettered")
    wait_until(lambda: node.handled == len(messages) - 1, message="messages not handled")
    data, entries = said(redis_client, keys)
    assert sorted(data) == [n for n in range(len(messages)) if n != 7]
    for k in range(clients):        # each client's emits in the order of its messages
        assert [n for n in data if n % clients == k] == [
            n for n in range(k, len(messages), clients) if n != 7]
    assert entries < len(messages) // 2, "the worker wrote one stream entry per message"
    # each handler saw its own message: one delivery each, two for the failing one
    assert {n: [d[0] for d in ds] for n, ds in deliveries.items()} == {
        n: [m.id] * (2 if n == 7 else 1) for n, m in enumerate(messages)}
    assert [attempt for _, attempt in deliveries[7]] == [0, 1]
    dead = json.loads(redis_client.lindex(keys.dead, 0))
    assert dead["error"] == "ValueError: seven fails"
    assert Envelope.decode(dead["raw"]).id == messages[7].id
    assert redis_client.llen(node.lanes[0].processing) == 0
    assert inbox_messages(redis_client, keys) == 0
    assert redis_client.llen(keys.ready) == 0 and not redis_client.keys(keys.queue_prefix + "*")


def test_a_handler_that_waits_gives_the_rest_of_its_batch_to_other_workers(
        cluster, config, redis_client):
    """A worker runs the clients' turns of its take in a row; a handler that waits sends
    what was done and gives the turns after it back to the inbox rather than keep them
    behind it. The first app-node has one worker, busy with the handler that waits: the
    turns after it get handled by a second app-node, started once that handler waits."""
    keys = Keys(config.prefix)
    quick_done, slow_waits = gevent.event.Event(), gevent.event.Event()
    handled, waited = [], []
    slow_at = 5
    # a client each: one client's messages wait behind each other anyway
    messages = [event(f"c{n}", "slow" if n == slow_at else "say", n)
                for n in range(3 * (TAKE_MORE + 1))]

    def make_app():
        app = App()

        @app.on("say")
        def say(sid, n):
            handled.append(n)
            app.emit("said", n, to="room")
            if len(handled) == len(messages) - 1:
                quick_done.set()

        @app.on("slow")
        def slow(sid, n):
            app.emit("said", n, to="room")
            app.sleep(0)         # sends the emit, and hands the rest of the batch back
            slow_waits.set()
            # every other message gets handled while this one still waits
            waited.append(quick_done.wait(timeout=5))

        return app

    fill_inbox(redis_client, keys, messages)
    first = cluster.app_node(make_app(), workers=1)
    assert slow_waits.wait(10), "the slow handler did not start"
    assert first.handled == slow_at, "the turns before the handler that waits were not written"
    other = cluster.app_node(make_app(), workers=2)
    wait_until(lambda: first.handled + other.handled == len(messages), timeout=10,
               message="not all handled")
    assert waited == [True], "turns stayed behind a handler that waited"
    assert sorted(handled) == [n for n in range(len(messages)) if n != slow_at]
    data, _ = said(redis_client, keys)
    assert sorted(data) == list(range(len(messages)))
    assert redis_client.llen(first.lanes[0].processing) == 0
    assert redis_client.llen(other.lanes[0].processing) == 0


def test_pushes_and_takes_go_on_after_redis_forgot_its_scripts(cluster, redis_client):
    app = App()

    @app.on("echo")
    def echo(sid, data):
        return data

    io = cluster.io_node()
    cluster.app_node(app)
    client = cluster.client(io)
    assert client.call("echo", 1) == [1]
    redis_client.script_flush()       # what a Redis restart without persistence does
    assert client.call("echo", 2) == [2]
    # a burst makes the app-node take several at once, by its script
    results = []
    calls = [gevent.spawn(lambda n=n: results.append(client.call("echo", n)))
             for n in range(40)]
    gevent.joinall(calls, timeout=10, raise_error=True)
    assert sorted(r[0] for r in results) == list(range(40))


def test_websocket_frames_are_unmasked_by_wsaccel_with_the_same_result(cluster):
    import os

    from geventwebsocket.websocket import Header

    cluster.io_node()
    assert getattr(Header.unmask_payload, "uses_wsaccel", False)
    for size in (0, 1, 3, 4, 5, 127, 70_000):
        header = Header(length=size)
        header.mask = os.urandom(4)
        payload = os.urandom(size)
        # gevent-websocket's own Python loop stays as `mask_payload`
        assert header.unmask_payload(payload) == header.mask_payload(payload)


def test_handlers_that_wait_run_side_by_side_though_their_messages_came_together(
        cluster, config, redis_client):
    """A burst of clients is taken in one round trip, yet each client of it goes to a free
    worker: handlers that wait (on I/O, here on an event) all run at once."""
    keys = Keys(config.prefix)
    app, release, running = App(), gevent.event.Event(), []

    @app.on("wait")
    def wait(sid, n):
        running.append(n)
        release.wait(timeout=10)
        app.emit("said", n, to="room")

    messages = [event(f"c{n}", "wait", n) for n in range(8)]
    fill_inbox(redis_client, keys, messages)
    node = cluster.app_node(app, workers=8)
    # one worker handling the burst in turn would start one at a time
    wait_until(lambda: len(running) == 8, message="the burst's handlers did not all start")
    release.set()
    wait_until(lambda: node.handled == 8, message="not all handled")
    data, _ = said(redis_client, keys)
    assert sorted(data) == list(range(8))
    assert redis_client.llen(node.lanes[0].processing) == 0 and not node._inflight


def test_a_burst_to_idle_workers_is_taken_and_written_in_one_round_trip_each(
        cluster, config, redis_client):
    """Messages of several clients that arrive together while every worker waits: with
    each of 32 workers blocked on the ready list, Redis would hand the burst out one client
    per worker, each with a take of its own. One worker waits at a time, so the burst is
    taken in one round trip; each client's messages come in that take together and are
    written in one stream entry (idle workers share the burst's clients, not a client's
    messages)."""
    keys = Keys(config.prefix)
    app = App()

    @app.on("say")
    def say(sid, n):
        app.emit("said", n, to="room")

    node = cluster.app_node(app, workers=32)
    wait_until(lambda: any(c["cmd"] == "blmove" for c in redis_client.client_list()),
               message="no worker waits on the inbox")
    redis_client.config_resetstat()
    bursts, clients, each = 6, 8, 4
    size = clients * each
    for burst in range(bursts):
        # one push: the burst, `each` messages of each of `clients` clients, arrives at once
        enqueue(redis_client, keys, *[event(f"c{n % clients}", "say", burst * size + n)
                                      for n in range(size)])
        wait_until(lambda done=(burst + 1) * size: node.handled == done,
                   message="burst not handled")
    data, entries = said(redis_client, keys)
    assert sorted(data) == list(range(bursts * size))
    for k in range(clients):        # each client's messages in order
        assert [n for n in data if n % clients == k] == list(range(k, bursts * size, clients))
    # one entry per client and burst at most: a message each would be `size` per burst
    assert entries <= clients * bursts, entries
    calls = {name.split("_", 1)[1]: int(v["calls"])
             for name, v in redis_client.info("commandstats").items()}
    # a blocking take per burst: one per client would be `clients` per burst
    assert calls.get("blmove", 0) <= 3 * bursts, calls
