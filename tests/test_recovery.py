"""Connection-state recovery: a client whose connection drops comes back as itself.

Real io-nodes and app-nodes on a Redis of the test's own, and real python-socketio clients
speaking socket.io's recovery protocol (`RecoveringClient`, as the official JS client does):
the same sid, its rooms and session, every packet it missed exactly once and in order; the
app's disconnect handler runs only for a client that did not come back in time.
"""

import socket
import time
import uuid

import gevent
import gevent.event
import pytest

from siocluster import App, IoNode
from siocluster.envelope import Envelope
from siocluster.recovery import Recovery
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(60)

FAST_RECONNECT = {"reconnection": True, "reconnection_delay": 0.05,
                  "reconnection_delay_max": 0.2, "randomization_factor": 0}


def room_app():
    app = App()
    seen = {"connects": [], "disconnects": []}

    @app.event
    def connect(sid, environ, auth):
        seen["connects"].append((sid, app.recovered(), auth))

    @app.event
    def disconnect(sid, reason):
        seen["disconnects"].append((sid, reason))

    @app.on("join")
    def join(sid, room):
        app.enter_room(sid, room)
        return "joined"

    @app.on("say")
    def say(sid, room, n):
        app.emit("said", n, to=room)
        return n

    @app.on("tell")
    def tell(sid, to, n):
        app.emit("told", n, to=to)
        return n

    @app.on("remember")
    def remember(sid, value):
        app.save_session(sid, {"value": value})
        return value

    @app.on("recall")
    def recall(sid):
        return app.get_session(sid).get("value")

    return app, seen


class Sender:
    """A member who keeps saying numbers to a room until stopped."""

    def __init__(self, client, room):
        self.client, self.room, self.sent = client, room, 0
        self.running = True
        self.greenlet = gevent.spawn(self._run)

    def _run(self):
        while self.running:
            assert self.client.call("say", self.room, self.sent) == [self.sent]
            self.sent += 1
            gevent.sleep(0.005)      # pacing: a steady stream, not a flood

    def stop(self):
        self.running = False
        self.greenlet.join(timeout=10)
        assert self.greenlet.successful(), self.greenlet.exception
        return self.sent


def numbers(client, event="said"):
    return [args[0] for args in client.received(event)]


def drop_transport(client):
    """Cut the client's TCP connection under it, as a network blip does."""
    sock = client.sio.eio.ws.sock
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def come_back(client, io_node):
    """Connect the same client object again (its pid and offset go with it), to ``io_node``."""
    client.sio.connect(f"http://127.0.0.1:{io_node.address[1]}", transports=["websocket"],
                       wait_timeout=5)


def wait_recovered(client, sid, timeout=10):
    wait_until(lambda: client.sio.connected and client.sio.get_sid("/") == sid
               and client.sio.recovered.get("/") is True, timeout=timeout,
               message=f"the client did not come back as {sid}: connected "
                       f"{client.sio.connected}, sid {client.sio.get_sid('/')}, recovered "
                       f"{client.sio.recovered}")


def test_a_transport_drop_in_a_busy_room_is_invisible(cluster):
    app, seen = room_app()
    io1, io2 = cluster.io_node(), cluster.io_node()
    cluster.app_node(app)
    cluster.app_node(app)
    listener = cluster.client(io1, **FAST_RECONNECT)
    sender = cluster.client(io2)
    assert listener.call("join", "r") == ["joined"] and sender.call("join", "r") == ["joined"]
    assert listener.call("remember", "kept") == ["kept"]
    sid = listener.sid
    talk = Sender(sender, "r")
    started = time.monotonic()
    wait_until(lambda: len(numbers(listener)) >= 20, timeout=10)
    for _ in range(3):                     # three blips while the room talks
        before = len(numbers(listener))
        drop_transport(listener)
        wait_until(lambda: not listener.sio.connected or listener.sio.recovered.get("/"),
                   timeout=5)
        wait_recovered(listener, sid)
        wait_until(lambda n=before + 20: len(numbers(listener)) >= n, timeout=10)
    sent = talk.stop()
    wait_until(lambda: len(numbers(listener)) >= sent, timeout=10,
               message=f"the listener has {len(numbers(listener))} of {sent}")
    assert numbers(listener) == list(range(sent))          # each once, in order
    print(f"\n{sent} messages in {time.monotonic() - started:.1f}s through 3 transport "
          "drops: each received once, in order")
    assert listener.sid == sid and listener.call("recall") == ["kept"]
    # the app never heard it leave, and heard each return as a recovered connect
    assert [s for s, _ in seen["disconnects"]] == []
    assert [(s, r) for s, r, _ in seen["connects"] if s == sid].count((sid, True)) >= 1
    assert (sid, False) in [(s, r) for s, r, _ in seen["connects"]]
    # still in its room: a message said now arrives
    assert sender.call("say", "r", "after") == ["after"]
    wait_until(lambda: numbers(listener)[-1:] == ["after"], timeout=5)


def test_an_io_node_stopped_hands_its_clients_to_its_successor_on_the_same_port(cluster):
    app, seen = room_app()
    io1, io2 = cluster.io_node(), cluster.io_node()
    cluster.app_node(app)
    listener = cluster.client(io1, **FAST_RECONNECT)
    sender = cluster.client(io2)
    assert listener.call("join", "r") == ["joined"] and sender.call("join", "r") == ["joined"]
    sid, port = listener.sid, io1.address[1]
    talk = Sender(sender, "r")
    wait_until(lambda: len(numbers(listener)) >= 20, timeout=10)
    first_ws = listener.sio.eio.ws         # python-socketio leaves it open after a drop
    io1.stop(timeout=5)                    # SIGTERM: what a rolling deploy does
    # its successor on the same port: the listener reconnects to the same URL
    successor = IoNode(cluster.config).start()
    cluster.io_nodes.append(successor)
    successor.start_server(("127.0.0.1", port))
    wait_recovered(listener, sid, timeout=15)
    wait_until(lambda: len(numbers(listener)) >= 60, timeout=10)
    sent = talk.stop()
    wait_until(lambda: len(numbers(listener)) >= sent, timeout=10)
    assert numbers(listener) == list(range(sent))
    assert seen["disconnects"] == []
    assert listener.sid == sid and successor.clients.get(sid) is not None
    first_ws.shutdown()


def test_a_client_of_a_killed_io_node_moves_to_another_with_nothing_lost(cluster):
    app, seen = room_app()
    io1, io2 = cluster.io_node(), cluster.io_node()
    cluster.app_node(app)
    listener = cluster.client(io1)
    sender = cluster.client(io2)
    assert listener.call("join", "r") == ["joined"] and sender.call("join", "r") == ["joined"]
    sid = listener.sid
    talk = Sender(sender, "r")
    wait_until(lambda: len(numbers(listener)) >= 20, timeout=10)
    kill(io1)                               # SIGKILL: nothing said, nothing parked
    wait_until(lambda: not listener.sio.connected, timeout=10)
    gevent.sleep(0.3)                       # some messages go by while it is away
    # the client (its page, say) moves to the other io-node, with its pid and offset
    come_back(listener, io2)
    wait_recovered(listener, sid)
    target = talk.sent + 20
    wait_until(lambda: len(numbers(listener)) >= target, timeout=10)
    sent = talk.stop()
    wait_until(lambda: len(numbers(listener)) >= sent, timeout=10)
    assert numbers(listener) == list(range(sent))
    # and when the reaper finds io1 dead, the client it moved is left alone
    wait_until(lambda: io1.id not in io2.state.nodes(alive=None), timeout=15,
               message="the dead io-node was not buried")
    assert seen["disconnects"] == [] and io2.state.client(sid)["node"] == io2.id


def kill(io_node):
    """Stop an io-node as SIGKILL would: its connections cut, no goodbye to anyone."""
    io_node.stopping.set()
    gevent.killall(list(io_node._greenlets), block=True)
    io_node.redis.connection_pool.disconnect()   # what the killed loops had checked out
    io_node.clients.clear()                 # so no disconnect is pushed or parked
    writers = [sock.writer for sock in io_node.sio.eio.sockets.values()]
    for writer in writers:
        writer.shutdown()                   # the kernel resets what a dead process held
    io_node._server.stop(timeout=0)
    for writer in writers:
        writer._socket.close()


def test_packets_to_the_client_alone_are_recovered_too(cluster):
    app, seen = room_app()
    io1 = cluster.io_node()
    cluster.app_node(app)
    listener = cluster.client(io1, **FAST_RECONNECT)
    other = cluster.client(io1)
    sid = listener.sid
    assert other.call("tell", sid, 0) == [0]
    listener.expect("told")
    # while it is away, three messages to it alone
    hold = gevent.event.Event()
    original = listener.sio._handle_connect

    def held(namespace, data):
        hold.wait(10)
        original(namespace, data)
    listener.sio._handle_connect = held
    drop_transport(listener)
    for n in (1, 2, 3):
        assert other.call("tell", sid, n) == [n]
    hold.set()
    wait_recovered(listener, sid)
    wait_until(lambda: len(numbers(listener, "told")) >= 4, timeout=5)
    assert numbers(listener, "told") == [0, 1, 2, 3]
    assert seen["disconnects"] == []


def test_a_client_away_longer_than_the_window_comes_back_new_and_its_disconnect_ran_once(
        cluster):
    app, seen = room_app()
    io1 = cluster.io_node(recovery_window=1.0)
    cluster.app_node(app, recovery_window=1.0)
    listener = cluster.client(io1)
    assert listener.call("join", "r") == ["joined"] and listener.call("remember", "x") == ["x"]
    sid = listener.sid
    drop_transport(listener)
    # the reaper closes its window (it waits a few seconds after its app-node started)
    wait_until(lambda: [s for s, _ in seen["disconnects"]] == [sid], timeout=20,
               message=f"no disconnect for {sid}: {seen['disconnects']}")
    wait_until(lambda: not listener.sio.connected, timeout=5)
    come_back(listener, io1)
    assert listener.sid != sid and listener.sio.recovered["/"] is False
    assert listener.call("recall") == []
    assert [s for s, _ in seen["disconnects"]] == [sid]          # once
    keys = io1.keys
    r = io1.redis
    assert r.zcard(keys.parked) == 0 and r.hlen(keys.parked_disconnects) == 0
    assert r.hget(keys.conns, sid) is None and r.hget(keys.clients, sid) is None


def test_a_client_that_missed_too_much_comes_back_new_and_the_app_hears_its_disconnect(
        cluster):
    app, seen = room_app()
    io1, io2 = cluster.io_node(recovery_max_packets=5), cluster.io_node()
    cluster.app_node(app)
    listener = cluster.client(io1)
    sender = cluster.client(io2)
    assert listener.call("join", "r") == ["joined"] and sender.call("join", "r") == ["joined"]
    sid = listener.sid
    drop_transport(listener)
    wait_until(lambda: not listener.sio.connected, timeout=5)
    wait_until(lambda: io1.redis.zscore(io1.keys.parked, sid) is not None, timeout=5)
    for n in range(10):
        assert sender.call("say", "r", n) == [n]
    come_back(listener, io1)
    assert listener.sid != sid and listener.sio.recovered["/"] is False
    wait_until(lambda: [s for s, _ in seen["disconnects"]] == [sid], timeout=20,
               message=f"no disconnect for {sid}: {seen['disconnects']}")


def test_a_client_that_says_goodbye_is_gone_at_once(cluster):
    app, seen = room_app()
    io1 = cluster.io_node()
    cluster.app_node(app)
    client = cluster.client(io1)
    sid = client.sid
    client.sio.disconnect()
    wait_until(lambda: [s for s, _ in seen["disconnects"]] == [sid], timeout=5)
    assert io1.redis.zcard(io1.keys.parked) == 0


def test_the_app_disconnecting_a_parked_client_ends_its_window(cluster):
    app, seen = room_app()

    @app.on("kick")
    def kick(sid, other):
        app.disconnect(other)

    io1 = cluster.io_node()
    cluster.app_node(app)
    away, kicker = cluster.client(io1), cluster.client(io1)
    sid = away.sid
    drop_transport(away)
    wait_until(lambda: io1.redis.zscore(io1.keys.parked, sid) is not None, timeout=5)
    kicker.call("kick", sid)
    wait_until(lambda: [s for s, _ in seen["disconnects"]] == [sid], timeout=20)
    come_back(away, io1)
    assert away.sid != sid and away.sio.recovered["/"] is False


def test_a_forged_or_unknown_private_id_connects_a_new_client(cluster):
    app, seen = room_app()
    io1 = cluster.io_node()
    cluster.app_node(app)
    victim = cluster.client(io1)
    sid = victim.sid
    for pid in (f"{sid}.{uuid.uuid4().hex}", "nonsense", 42, {"a": 1}):
        intruder = cluster.client(io1, connect=False)
        intruder.connect_to(io1, auth={"pid": pid, "offset": "0-0.0", "token": "t"})
        assert intruder.sid != sid and intruder.sio.recovered["/"] is False
        intruder.close()
    assert victim.call("join", "r") == ["joined"]            # untouched
    # the app saw the auth without the recovery fields
    assert [auth for s, _, auth in seen["connects"] if s != sid][0] == {"token": "t"}


def test_a_recovered_client_carries_on_where_it_left_its_events(cluster):
    """Events the client sends after it came back are handled in order after its earlier
    ones, by its session."""
    app, seen = room_app()
    io1, io2 = cluster.io_node(), cluster.io_node()
    cluster.app_node(app)
    client = cluster.client(io1)
    sid = client.sid
    assert client.call("remember", 1) == [1]
    drop_transport(client)
    wait_until(lambda: not client.sio.connected, timeout=5)
    come_back(client, io2)
    wait_recovered(client, sid)
    assert client.call("recall") == [1]
    assert client.call("remember", 2) == [2] and client.call("recall") == [2]
    assert io2.state.client(sid)["node"] == io2.id


def test_recovery_state_is_bounded_in_redis(config, redis_client):
    """What a parked client leaves in Redis goes with it: the window, its envelope, its
    connection."""
    from siocluster.state import ClusterState, Keys
    keys = Keys(config.prefix)
    state = ClusterState(redis_client, keys)
    recovery = Recovery(redis_client, keys, config.replace(recovery_window=0.01))
    state.add_client({"sid": "s1", "namespace": "/", "node": "io-a", "info": {},
                      "pid": "s1.x", "conn": "c1"})
    pipe = redis_client.pipeline(transaction=False)
    recovery.park(pipe, "s1", "c1", "io-a", Envelope("disconnect", "/", "s1", "io-a").encode())
    assert pipe.execute() == [1]
    wait_until(lambda: recovery.due() != [], timeout=2)
    state.forget_client("s1", "/", "io-a")
    assert redis_client.zcard(keys.parked) == 0 and redis_client.hlen(keys.parked_disconnects) == 0
    assert redis_client.hlen(keys.conns) == 0
    # a connection that is not the client's own cannot park it
    state.add_client({"sid": "s2", "namespace": "/", "node": "io-a", "info": {},
                      "pid": "s2.x", "conn": "c2"})
    pipe = redis_client.pipeline(transaction=False)
    recovery.park(pipe, "s2", "old", "io-a", "{}")
    assert pipe.execute() == [0] and redis_client.zcard(keys.parked) == 0


def test_rolling_a_whole_tier_of_io_nodes_loses_nothing(cluster):
    """The documented rolling deploy: each io-node in turn is stopped and its successor
    started on its port; the clients of each come back as themselves, with every message
    said meanwhile."""
    app, seen = room_app()
    tier = [cluster.io_node(), cluster.io_node()]
    outside = cluster.io_node()                 # the sender's, not rolled here
    cluster.app_node(app)
    listeners = [cluster.client(io, **FAST_RECONNECT) for io in tier]
    sender = cluster.client(outside)
    for client in listeners + [sender]:
        assert client.call("join", "r") == ["joined"]
    sids = [client.sid for client in listeners]
    talk = Sender(sender, "r")
    for io, listener, sid in zip(tier, listeners, sids):
        first_ws = listener.sio.eio.ws          # python-socketio leaves it open after a drop
        port = io.address[1]
        before = len(numbers(listener))
        io.stop(timeout=5)
        successor = IoNode(cluster.config).start()
        cluster.io_nodes.append(successor)
        successor.start_server(("127.0.0.1", port))
        wait_recovered(listener, sid, timeout=15)
        wait_until(lambda n=before + 20, c=listener: len(numbers(c)) >= n, timeout=10)
        first_ws.shutdown()
    sent = talk.stop()
    for listener, sid in zip(listeners, sids):
        wait_until(lambda c=listener: len(numbers(c)) >= sent, timeout=10)
        assert numbers(listener) == list(range(sent)) and listener.sid == sid
    assert seen["disconnects"] == []


def test_what_a_connect_handler_sends_arrives_after_the_connect_and_once(cluster):
    """Emits the connect handler makes reach the client after its CONNECT (a python client
    gets them without the offset), and a returning client gets a broadcast made while it
    comes back once: from the replay, not also live."""
    app = App()

    @app.event
    def connect(sid, environ, auth):
        app.emit("welcome", "hi", to=sid)
        app.emit("arrived", sid)                       # to everyone in the namespace

    io1 = cluster.io_node()
    cluster.app_node(app)
    client = cluster.client(io1, **FAST_RECONNECT)
    assert client.expect("welcome") == [["hi"]]
    sid = client.sid
    wait_until(lambda: client.received("arrived") == [[sid]])
    drop_transport(client)
    wait_recovered(client, sid)
    assert client.expect("welcome", 2) == [["hi"], ["hi"]]
    wait_until(lambda: len(client.received("arrived")) >= 2)
    assert client.received("arrived") == [[sid], [sid]]         # once for each connect


def test_a_connecting_client_that_would_miss_packets_is_cut_off(cluster):
    """Packets held for a client until its connect is answered are bounded: past the bound
    it would miss some, so it is disconnected instead of being let in with a gap."""
    app = App()
    gate = gevent.event.Event()

    @app.event
    def connect(sid, environ, auth):
        if auth == "slow":
            gate.wait(5)

    @app.on("shout")
    def shout(sid, n):
        app.emit("shouted", n)                          # to the whole namespace
        return n

    io1 = cluster.io_node()
    cluster.app_node(app)
    io1.sio.held.limit = 5
    shouter = cluster.client(io1)
    slow = cluster.client(io1, connect=False)
    connecting = gevent.spawn(slow.connect_to, io1, auth="slow")
    wait_until(lambda: len(io1.sio.held.lists) == 1, message="the connect is not held")
    for n in range(10):
        assert shouter.call("shout", n) == [n]
    gate.set()
    connecting.join(10)
    wait_until(lambda: not slow.sio.connected, timeout=10,
               message="the client that missed packets was let in")
    assert slow.received("shouted") == []
