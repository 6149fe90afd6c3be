"""The example chat's protocol, through real Socket.IO clients on two io-nodes.

Two app-nodes run `example_chat.app.app`, so consecutive messages of one client are handled
by either: the chat must keep nothing in the process. "Nothing else arrived" is checked with
a barrier: commands to every io-node go through one stream in order, so once a later
message has arrived, an earlier one that was meant for the client would have too.
"""

import json

import pytest

from example_chat import app as chat
from tests.helpers import wait_until


@pytest.fixture
def io(cluster):
    """Two io-nodes and two app-nodes running the chat; returns the io-nodes."""
    nodes = [cluster.io_node(), cluster.io_node()]
    cluster.app_node(chat.app)
    cluster.app_node(chat.app)
    return nodes


def ack(client, event, *payload):
    """The one argument of the ack of ``event``."""
    answer = client.call(event, *payload)
    assert len(answer) == 1, answer
    return answer[0]


def join(client, name, room):
    answer = ack(client, "join", {"name": name, "room": room})
    assert answer["ok"] is True, answer
    return answer


def say(client, text):
    answer = ack(client, "say", {"text": text})
    assert answer["ok"] is True, answer
    return answer


def events(client, *names):
    """The client's events of those names, in arrival order, as (name, data)."""
    return [(event, args[0]) for ns, event, args in client.events if event in names]


def barrier(cluster, io_node, room="barrier-room"):
    """A client of its own says something in a room of its own and waits for it: every
    command sent before has been applied by ``io_node`` once this returns."""
    client = cluster.client(io_node)
    join(client, "barrier", room)
    said = say(client, "barrier")
    wait_until(lambda: any(d["id"] == said["id"] for _, d in events(client, "said")),
               message="the barrier message did not arrive")


def history_texts(redis_client, room):
    return [json.loads(raw)["text"]
            for raw in redis_client.lrange(chat.app.key("history", room), 0, -1)]


def test_join_answers_members_and_history_and_tells_the_room(cluster, io):
    alice, bob = cluster.client(io[0]), cluster.client(io[1])

    first = join(alice, "alice", "lobby")
    assert first == {"ok": True, "room": "lobby", "members": ["alice"], "history": []}
    assert alice.expect("presence")[0] == [
        {"room": "lobby", "members": ["alice"], "joined": "alice"}]

    second = join(bob, "bob", "lobby")
    assert second == {"ok": True, "room": "lobby", "members": ["alice", "bob"], "history": []}
    expected = {"room": "lobby", "members": ["alice", "bob"], "joined": "bob"}
    assert alice.expect("presence", 2)[1] == [expected]
    assert bob.expect("presence")[0] == [expected]


def test_names_are_trimmed_and_32_characters_are_allowed(cluster, io):
    alice = cluster.client(io[0])
    name = "a" * 32
    assert join(alice, f"  {name} ", " lobby ")["members"] == [name]
    assert join(alice, name, "lobby")["room"] == "lobby"


def test_said_reaches_everyone_in_the_room_across_io_nodes_and_nobody_else(cluster, io):
    alice, bob = cluster.client(io[0]), cluster.client(io[1])
    carol, dave = cluster.client(io[1]), cluster.client(io[0])
    join(alice, "alice", "lobby")
    join(bob, "bob", "lobby")
    join(carol, "carol", "elsewhere")
    join(dave, "dave", "elsewhere")

    answer = say(alice, "hello, bob")
    assert set(answer) == {"ok", "id"} and answer["id"]
    for client in (alice, bob):
        said = client.expect("said")[0][0]
        assert said["id"] == answer["id"]
        assert {k: said[k] for k in ("room", "name", "text")} == {
            "room": "lobby", "name": "alice", "text": "hello, bob"}
        assert isinstance(said["ts"], int) and said["ts"] > 1_600_000_000_000

    # the other room's message was sent after alice's: whoever has it would have had hers
    other = say(dave, "meanwhile")
    for client in (carol, dave):
        assert client.expect("said")[0][0]["text"] == "meanwhile"
        assert [d["id"] for _, d in events(client, "said")] == [other["id"]]
    assert [d["id"] for _, d in events(alice, "said")] == [answer["id"]]


def test_a_2000_character_text_is_said_as_sent(cluster, io):
    alice, bob = cluster.client(io[0]), cluster.client(io[1])
    join(alice, "alice", "lobby")
    join(bob, "bob", "lobby")
    text = " x" * 1000
    answer = say(alice, text)
    said = bob.expect("said")[0][0]
    assert (said["id"], said["text"]) == (answer["id"], text)


def test_history_keeps_the_last_50_messages_oldest_first(cluster, io, redis_client):
    alice = cluster.client(io[0])
    join(alice, "alice", "lobby")
    ids = [say(alice, f"message {n}")["id"] for n in range(55)]

    bob = cluster.client(io[1])
    history = join(bob, "bob", "lobby")["history"]
    assert [m["text"] for m in history] == [f"message {n}" for n in range(5, 55)]
    assert [m["id"] for m in history] == ids[5:]
    assert {(m["room"], m["name"]) for m in history} == {("lobby", "alice")}
    assert [m["ts"] for m in history] == sorted(m["ts"] for m in history)
    assert len(history_texts(redis_client, "lobby")) == 50

    # another room has a history of its own
    assert join(bob, "bob", "empty room")["history"] == []


def test_leave_tells_the_room_and_stops_the_messages(cluster, io, redis_client):
    alice, bob = cluster.client(io[0]), cluster.client(io[1])
    join(alice, "alice", "lobby")
    join(bob, "bob", "lobby")
    alice.expect("presence", 2)

    assert ack(bob, "leave", {}) == {"ok": True}
    assert alice.expect("presence", 3)[2] == [{"room": "lobby", "members": ["alice"],
                                               "left": "bob"}]
    assert ack(bob, "say", {"text": "anyone?"}) == {"ok": False, "error": "join a room first"}
    assert ack(bob, "leave", {}) == {"ok": False, "error": "not in a room"}
    said = say(alice, "bob is gone")
    alice.expect("said")
    barrier(cluster, io[1])
    assert [d["id"] for _, d in events(bob, "said")] == []
    assert history_texts(redis_client, "lobby") == ["bob is gone"]
    assert said["id"] == events(alice, "said")[0][1]["id"]

    # a client that left may join again, under its name
    assert join(bob, "bob", "lobby")["members"] == ["alice", "bob"]


def test_disconnect_tells_the_room(cluster, io):
    alice, bob = cluster.client(io[0]), cluster.client(io[1])
    join(alice, "alice", "lobby")
    join(bob, "bob", "lobby")
    alice.expect("presence", 2)

    bob.close()
    assert alice.expect("presence", 3)[2] == [{"room": "lobby", "members": ["alice"],
                                               "left": "bob"}]
    carol = cluster.client(io[1])
    assert join(carol, "carol", "lobby")["members"] == ["alice", "carol"]


def test_a_disconnect_before_joining_tells_nobody(cluster, io):
    alice, bob = cluster.client(io[0]), cluster.client(io[1])
    join(alice, "alice", "lobby")
    sid = bob.sid
    bob.close()
    # the app-node forgets a client in the same write as its disconnect handler's commands
    wait_until(lambda: chat.app.client(sid) is None, message="the disconnect was not handled")
    barrier(cluster, io[0])
    assert events(alice, "presence") == [("presence", {"room": "lobby", "members": ["alice"],
                                                       "joined": "alice"})]


def test_joining_another_room_leaves_the_current_one(cluster, io, redis_client):
    alice, bob = cluster.client(io[0]), cluster.client(io[1])
    join(alice, "alice", "lobby")
    join(bob, "bob", "lobby")
    say(alice, "in the lobby")
    alice.expect("presence", 2)

    moved = join(bob, "bob", "garden")
    assert moved == {"ok": True, "room": "garden", "members": ["bob"], "history": []}
    assert alice.expect("presence", 3)[2] == [{"room": "lobby", "members": ["alice"],
                                               "left": "bob"}]
    assert bob.expect("presence", 2)[1] == [{"room": "garden", "members": ["bob"],
                                             "joined": "bob"}]

    said = say(bob, "in the garden")
    assert said["id"] == bob.expect("said", 2)[1][0]["id"]
    say(alice, "lobby again")
    alice.expect("said", 2)
    barrier(cluster, io[1])
    assert [d["text"] for _, d in events(bob, "said")] == ["in the lobby", "in the garden"]
    assert [d["text"] for _, d in events(alice, "said")] == ["in the lobby", "lobby again"]
    assert history_texts(redis_client, "garden") == ["in the garden"]

    # joining the room one is in again says so to the room, without leaving it
    assert join(bob, "bob", "garden")["members"] == ["bob"]
    bob.expect("presence", 3)
    assert [d.get("left") for _, d in events(bob, "presence")] == [None, None, None]


def test_members_list_a_name_once(cluster, io):
    first, second = cluster.client(io[0]), cluster.client(io[1])
    join(first, "alice", "lobby")
    assert join(second, "alice", "lobby")["members"] == ["alice"]
    second.close()
    assert first.expect("presence", 3)[2] == [{"room": "lobby", "members": ["alice"],
                                               "left": "alice"}]


BAD_INPUTS = [
    pytest.param("join", ({"room": "lobby"},), "name is required", id="join-no-name"),
    pytest.param("join", ({"name": "   ", "room": "lobby"},), "name is required",
                 id="join-blank-name"),
    pytest.param("join", ({"name": "x" * 33, "room": "lobby"},),
                 "name is longer than 32 characters", id="join-name-33-chars"),
    pytest.param("join", ({"name": 7, "room": "lobby"},), "name must be a string",
                 id="join-name-not-a-string"),
    pytest.param("join", ({"name": "mallory"},), "room is required", id="join-no-room"),
    pytest.param("join", ({"name": "mallory", "room": "r" * 65},),
                 "room is longer than 64 characters", id="join-room-too-long"),
    pytest.param("join", ("mallory",), None, id="join-string-payload"),
    pytest.param("join", (["mallory", "lobby"],), None, id="join-list-payload"),
    pytest.param("join", (), None, id="join-no-payload"),
    pytest.param("join", ({"name": "mallory", "room": "lobby"}, "extra"), None,
                 id="join-two-arguments"),
    pytest.param("say", ({"text": ""},), "text is empty", id="say-empty-text"),
    pytest.param("say", ({"text": " \n\t "},), "text is empty", id="say-blank-text"),
    pytest.param("say", ({"text": "x" * 2001},), "text is longer than 2000 characters",
                 id="say-text-2001-chars"),
    pytest.param("say", ({},), "text is required", id="say-no-text"),
    pytest.param("say", ({"text": 42},), "text must be a string", id="say-text-not-a-string"),
    pytest.param("say", ("hello",), None, id="say-string-payload"),
    pytest.param("say", (42,), None, id="say-number-payload"),
    pytest.param("leave", ("now",), None, id="leave-string-payload"),
    pytest.param("leave", (), None, id="leave-no-payload"),
]


@pytest.mark.parametrize("event, payload, error", BAD_INPUTS)
def test_bad_input_is_refused_and_changes_nothing(cluster, io, redis_client, event, payload,
                                                  error):
    mallory, bob = cluster.client(io[0]), cluster.client(io[1])
    join(mallory, "mallory", "lobby")
    join(bob, "bob", "lobby")
    say(mallory, "before")
    bob.expect("said")
    session = chat.app.get_session(mallory.sid)
    room = chat.app.room_members("chat:lobby")

    answer = ack(mallory, event, *payload)
    assert answer["ok"] is False and set(answer) == {"ok", "error"}
    assert isinstance(answer["error"], str) and answer["error"]
    if error is not None:
        assert answer["error"] == error
    else:
        assert "payload" in answer["error"]

    assert chat.app.get_session(mallory.sid) == session == {"name": "mallory", "room": "lobby"}
    assert chat.app.room_members("chat:lobby") == room
    assert history_texts(redis_client, "lobby") == ["before"]
    # mallory is still in the lobby, under her name, and bob heard nothing in between
    after = say(mallory, "after")
    wait_until(lambda: len(events(bob, "said")) == 2, message="bob did not get 'after'")
    assert [(d["name"], d["text"]) for _, d in events(bob, "said")] == [
        ("mallory", "before"), ("mallory", "after")]
    assert events(bob, "said")[1][1]["id"] == after["id"]
    assert [d.get("joined") for _, d in events(bob, "presence")] == ["bob"]


@pytest.mark.parametrize("event, payload, error", [
    ("say", {"text": "hi"}, "join a room first"),
    ("leave", {}, "not in a room"),
    ("join", {"name": "x" * 33, "room": "lobby"}, "name is longer than 32 characters"),
    ("join", {"name": "newcomer"}, "room is required"),
], ids=["say-before-join", "leave-before-join", "bad-first-join", "first-join-no-room"])
def test_bad_input_before_joining_changes_nothing(cluster, io, redis_client, event, payload,
                                                  error):
    newcomer, bob = cluster.client(io[0]), cluster.client(io[1])
    join(bob, "bob", "lobby")

    assert ack(newcomer, event, payload) == {"ok": False, "error": error}
    assert ack(newcomer, "say", {"text": "still?"}) == {"ok": False,
                                                        "error": "join a room first"}
    assert chat.app.get_session(newcomer.sid) == {}
    assert chat.app.room_members("chat:lobby") == [bob.sid]
    assert history_texts(redis_client, "lobby") == []
    barrier(cluster, io[1])
    assert [d.get("joined") for _, d in events(bob, "presence")] == ["bob"]
    assert events(bob, "said") == []
