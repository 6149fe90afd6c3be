"""A client's messages are handled in order, one at a time, across all app-nodes; its
session's read-modify-writes are never lost; ``App(async_handlers=True)`` opts out.

Every handler here yields (a short sleep or a Redis round trip) between reading and
writing, so handling one client's messages side by side would reorder them or lose
increments: these tests fail on a cluster without the per-client queues.
"""

import random

import gevent
import gevent.event
import gevent.queue

from siocluster import App
from siocluster.inbox import Inbox
from siocluster.state import Keys
from tests.helpers import EventClient, wait_until

BURST = 50


def two_app_nodes(cluster, app, workers=4):
    return [cluster.app_node(app, workers=workers), cluster.app_node(app, workers=workers)]


def test_a_burst_from_one_client_is_handled_in_order_one_at_a_time(cluster):
    app, handled, running, most = App(), [], {}, {}

    @app.on("step")
    def step(sid, n):
        running[sid] = running.get(sid, 0) + 1
        most[sid] = max(most.get(sid, 0), running[sid])
        gevent.sleep(random.random() * 0.004)     # a handler that waits on something
        handled.append((sid, n))
        running[sid] -= 1
        return n

    io = cluster.io_node()
    nodes = two_app_nodes(cluster, app)
    a, b = cluster.client(io), cluster.client(io)
    answers = gevent.queue.Queue()
    for n in range(BURST):
        a.sio.emit("step", n, callback=lambda m: answers.put(("a", m)))
        b.sio.emit("step", n, callback=lambda m: answers.put(("b", m)))
    got = [answers.get(timeout=20) for _ in range(2 * BURST)]
    for sid in (a.sid, b.sid):
        assert [n for s, n in handled if s == sid] == list(range(BURST))
        assert most[sid] == 1, f"{most[sid]} handlers of one client ran at once"
    # each client's acks come back in order too
    for name in ("a", "b"):
        assert [m for who, m in got if who == name] == list(range(BURST))
    # both app-nodes took part, and the two clients were handled side by side
    assert all(node.handled > 0 for node in nodes), [node.handled for node in nodes]


def test_a_session_counter_incremented_by_fifty_events_ends_at_fifty(cluster, redis_client):
    app = App()

    @app.on("count")
    def count(sid):
        with app.session(sid) as session:
            seen = session.get("count", 0)
            app.redis.ping()                  # a round trip between the read and the write
            session["count"] = seen + 1

    @app.on("bump")
    def bump(sid):
        session = app.get_session(sid)        # python-socketio's get/save pair
        gevent.sleep(0.001)
        session["bumps"] = session.get("bumps", 0) + 1
        app.save_session(sid, session)

    @app.on("read")
    def read(sid):
        return app.get_session(sid)

    io = cluster.io_node()
    two_app_nodes(cluster, app)
    client = cluster.client(io)
    for _ in range(BURST):
        client.sio.emit("count")
        client.sio.emit("bump")
    assert client.call("read", timeout=20) == [{"count": BURST, "bumps": BURST}]
    # written to Redis, where every app-node reads it
    stored = App()
    cluster.app_node(stored)
    assert stored.get_session(client.sid) == {"count": BURST, "bumps": BURST}


def test_a_failed_message_is_retried_before_the_clients_later_ones(cluster):
    app, handled = App(), []

    @app.on("step")
    def step(sid, n):
        handled.append(n)
        if n == 5 and handled.count(5) == 1:
            raise RuntimeError("five fails the first time")

    io = cluster.io_node()
    two_app_nodes(cluster, app)
    client = cluster.client(io)
    for n in range(20):
        client.sio.emit("step", n)
    wait_until(lambda: len(handled) == 21, timeout=15, message=f"handled {handled}")
    assert handled == [0, 1, 2, 3, 4, 5, 5, *range(6, 20)]


def two_steps_waiting(cluster):
    """A client's connect and two `step` events waiting in its queue, no app-node yet: an
    app-node started next takes them together."""
    io = cluster.io_node(connect_timeout=0.3, connect_timeout_accept=True)
    client = EventClient().connect_to(io)
    cluster.clients.append(client)
    client.sio.emit("step", 0)
    client.sio.emit("step", 1)
    inbox = Inbox(io.redis, Keys(cluster.config.prefix), cluster.config)
    wait_until(lambda: inbox.size()[0] == 3, message="the events did not reach the inbox")


def test_with_async_handlers_one_clients_handlers_run_side_by_side(cluster):
    app, overlapped = App(async_handlers=True), []
    second = gevent.event.Event()

    @app.on("step")
    def step(sid, n):
        if n == 0:
            # waits for the client's next message's handler to start
            overlapped.append(second.wait(timeout=3))
        else:
            second.set()

    two_steps_waiting(cluster)
    cluster.app_node(app)
    wait_until(lambda: overlapped, timeout=10, message="the first handler never ran")
    assert overlapped == [True], "the second handler did not start while the first waited"


def test_without_async_handlers_the_same_messages_wait_their_turn(cluster):
    app, overlapped, handled = App(), [], []
    second = gevent.event.Event()

    @app.on("step")
    def step(sid, n):
        if n == 0:
            overlapped.append(second.wait(timeout=0.5))
        else:
            second.set()
        handled.append(n)

    two_steps_waiting(cluster)
    cluster.app_node(app, workers=8)
    wait_until(lambda: handled == [0, 1], timeout=10, message=f"handled {handled}")
    assert overlapped == [False]


def test_a_slow_client_does_not_hold_up_the_others(cluster):
    app, done = App(), []
    release = gevent.event.Event()

    @app.on("slow")
    def slow(sid):
        release.wait(timeout=10)

    @app.on("fast")
    def fast(sid, n):
        done.append(n)
        return n

    io = cluster.io_node()
    cluster.app_node(app, workers=4)
    slow_client, fast_client = cluster.client(io), cluster.client(io)
    for _ in range(3):
        slow_client.sio.emit("slow")
    # the slow client's turn is held; everyone else's messages still flow
    for n in range(10):
        assert fast_client.call("fast", n, timeout=5) == [n]
    release.set()


def test_a_clients_queue_is_bounded(cluster):
    from siocluster.outbox import INBOX_FULL

    # no app-node: nothing drains the client's queue
    io = cluster.io_node(client_queue_maxlen=5, connect_timeout=0.3,
                         connect_timeout_accept=True)
    client, other = cluster.client(io), cluster.client(io)
    answers = gevent.queue.Queue()
    for n in range(8):
        client.sio.emit("rec", n, callback=lambda *a, n=n: answers.put((n, a)))
    refused = sorted(answers.get(timeout=5) for _ in range(4))
    # the connect and 4 events fill its 5 places; the rest are refused, others are not
    assert [n for n, _ in refused] == [4, 5, 6, 7]
    assert all(a == ({"ok": False, "error": INBOX_FULL},) for _, a in refused)
    other.sio.emit("rec", "fine", callback=lambda *a: answers.put(("other", a)))
    keys = Keys(cluster.config.prefix)
    inbox = Inbox(io.redis, keys, cluster.config)
    wait_until(lambda: inbox.size()[0] == 5 + 2, message="the other client's event was refused")
    assert answers.empty()
    # what the queues hold, not only what the inbox counts: the refused are not in them
    queued = [io.redis.lrange(key, 0, -1) for key in io.redis.scan_iter(keys.queue_prefix + "*")]
    assert sorted(map(len, queued)) == [2, 5], queued


def test_a_handler_that_raises_leaves_the_session_as_it_was(cluster):
    app = App()

    @app.on("spend")
    def spend(sid, amount):
        with app.session(sid) as session:
            session["balance"] = session.get("balance", 100) - amount
        if amount > 50:
            raise ValueError("too much: the change must not stick")
        return app.get_session(sid)["balance"]

    @app.on("balance")
    def balance(sid):
        return app.get_session(sid).get("balance", 100)

    io = cluster.io_node()
    cluster.app_node(app, max_attempts=2)
    client = cluster.client(io)
    client.sio.emit("spend", 10)
    client.sio.emit("spend", 80)        # fails twice, then dead-lettered
    client.sio.emit("spend", 5)
    assert client.call("balance", timeout=10) == [85]


def test_app_writes_go_with_the_finish_and_are_dropped_when_the_handler_raises(
        cluster, redis_client, caplog):
    import pytest

    app = App()

    @app.on("note")
    def note(sid, text):
        app.writes().rpush(app.key("notes"), text)
        if text == "bad":
            raise ValueError("dropped with its writes")
        app.emit("noted", text, to=sid)

    @app.on("wrong")
    def wrong(sid):
        app.writes().incr(app.key("notes"))      # a list: Redis refuses, the app's bug
        return "finished all the same"

    io = cluster.io_node()
    node = cluster.app_node(app, max_attempts=1)
    client = cluster.client(io)
    client.sio.emit("note", "one")
    client.sio.emit("note", "bad")
    client.sio.emit("note", "two")
    client.expect("noted", count=2)
    # the notes of the handlers that returned, not of the one that raised
    assert redis_client.lrange(node.keys.app("notes"), 0, -1) == ["one", "two"]
    assert client.call("wrong", timeout=5) == ["finished all the same"]
    # logged once the finish's replies are read, which may be after its ack was delivered
    wait_until(lambda: "app.writes() command failed" in caplog.text, timeout=5,
               message="the refused app.writes() command was not logged")
    with pytest.raises(RuntimeError, match="outside a handler"):
        app.writes()
