"""Envelopes and command batches: versioned JSON, binary as base64, malformed data refused."""

import json

import pytest

from siocluster.envelope import (
    VERSION,
    Envelope,
    MessageError,
    args_to_data,
    data_to_args,
    decode_batch,
    emit_command,
    encode_batch,
    pack_args,
    unpack_args,
)


def test_event_envelope_round_trip():
    env = Envelope("event", "/chat", "sid1", "io-1", {"user": "ann"}, event="say",
                   args=[{"text": "hi"}, 3], ack=True)
    raw = env.encode()
    message = json.loads(raw)
    assert message["v"] == VERSION and message["kind"] == "event" and message["ack"] is True
    assert {"id", "ts", "node", "client", "attempt"} <= set(message)
    back = Envelope.decode(raw)
    assert back == env


def test_binary_arguments_travel_as_base64():
    env = Envelope("event", "/", "s", "n", event="file", args=[{"blob": b"\x00\x01"}, b"raw"])
    raw = env.encode()
    assert "\\u0000" not in raw and "bin" in json.loads(raw)
    assert Envelope.decode(raw).args == [{"blob": b"\x00\x01"}, b"raw"]


def test_what_only_the_standard_json_encodes_travels_as_it_would():
    # orjson goes first and refuses these: the standard library's answer is kept
    args = [2**70, {1: "int key"}]
    env = Envelope("event", "/", "s", "n", event="big", args=args)
    assert Envelope.decode(env.encode()).args == [2**70, {"1": "int key"}]
    command = emit_command("big", args, "/")
    assert unpack_args(command) == [2**70, {"1": "int key"}]


def test_connect_and_disconnect_envelopes():
    connect = Envelope("connect", "/", "s", "n", environ={"HTTP_ORIGIN": "x"},
                       auth={"token": "t"})
    assert Envelope.decode(connect.encode()).auth == {"token": "t"}
    assert Envelope.decode(connect.encode()).environ == {"HTTP_ORIGIN": "x"}
    gone = Envelope("disconnect", "/", "s", "n", reason="transport close")
    assert Envelope.decode(gone.encode()).reason == "transport close"


@pytest.mark.parametrize("raw", [
    "not json", "[]", json.dumps({"v": 99, "kind": "event"}),
    json.dumps({"v": VERSION, "kind": "smoke", "id": "1", "ns": "/", "sid": "s", "node": "n"}),
    json.dumps({"v": VERSION, "kind": "event", "id": "1", "ns": "/", "sid": 5, "node": "n"}),
    json.dumps({"v": VERSION, "kind": "event", "id": "1", "ns": "/", "sid": "s", "node": "n"}),
    json.dumps({"v": VERSION, "kind": "event", "id": "1", "ns": "/", "sid": "s", "node": "n",
                "event": "e", "args": "notalist"}),
    json.dumps({"v": VERSION, "kind": "event", "id": "1", "ns": "/", "sid": "s", "node": "n",
                "event": "e", "args": [{"_placeholder": True, "num": 3}], "bin": ["AA=="]}),
])
def test_malformed_envelopes_are_refused(raw):
    with pytest.raises(MessageError):
        Envelope.decode(raw)


def test_command_batches():
    commands = [{"m": "emit", "ns": "/", "event": "e", **pack_args([b"x", 1])},
                {"m": "enter_room", "ns": "/", "sid": "s", "room": "r"}]
    assert decode_batch(encode_batch(commands)) == json.loads(encode_batch(commands))["c"]
    assert unpack_args(decode_batch(encode_batch(commands))[0]) == [b"x", 1]
    # an older app-node's batch is read too (io-nodes are upgraded first)
    assert decode_batch(json.dumps({"v": 1, "c": commands[1:]})) == commands[1:]
    for bad in ("{}", json.dumps({"v": 3, "c": []}),
                json.dumps({"v": VERSION, "c": [{"m": "explode"}]}),
                json.dumps({"v": VERSION, "c": [{"m": "emit", "ns": "/"}]}),
                json.dumps({"v": VERSION, "c": ["emit"]})):
        with pytest.raises(MessageError):
            decode_batch(bad)


def test_emits_and_acks_carry_their_arguments_as_json_text():
    from siocluster.envelope import ack_command, event_data, with_arg

    for args in ([], [1], [{"name": "é", "n": 2 ** 70}, [None, True]], ["x", "y"]):
        command = emit_command("said", args, "/", to="room")
        text = command["json"]
        assert "args" not in command and json.loads(text) == args
        assert unpack_args(decode_batch(encode_batch([command]))[0]) == args
        assert json.loads(event_data("said", text)) == ["said", *args]
        assert json.loads(with_arg(text, "1-0.2")) == [*args, "1-0.2"]
        assert unpack_args(ack_command("id", args)) == args
    # bytes keep python-socketio's attachments
    command = emit_command("said", [b"x", 1], "/")
    assert "json" not in command and unpack_args(command) == [b"x", 1]
    with pytest.raises(TypeError):
        emit_command("said", [{1, 2}], "/")          # a set: the handler hears it at once
    for bad in ('{"a": 1}', "1", 5, "[1"):
        with pytest.raises(MessageError):
            decode_batch(encode_batch([{"m": "emit", "ns": "/", "event": "e", "json": bad}]))


def test_python_socketio_data_convention():
    assert data_to_args(None) == [] and args_to_data([]) == ()
    assert data_to_args((1, 2)) == [1, 2] and args_to_data([1, 2]) == (1, 2)
    assert data_to_args([1, 2]) == [[1, 2]] and args_to_data([[1, 2]]) == [1, 2]


def test_the_fast_json_reads_and_writes_what_the_standard_library_does():
    import json
    import math

    from siocluster.envelope import JSON, dumps, loads

    values = [{"a": [1, 2.5, None, True], "ü": "héllo ✓"}, 2 ** 70, -2 ** 64, 1e300,
              "lone \ud800 surrogate", {1: "int key", "nested": {"x": []}}, [], "", 0.1]
    for value in values:
        expected = json.loads(json.dumps(value))
        assert loads(dumps(value)) == expected, value
        assert json.loads(JSON.dumps(value, separators=(",", ":"))) == expected, value
        # what reaches a websocket is always valid UTF-8
        JSON.dumps(value, separators=(",", ":")).encode("utf-8")
    assert math.isnan(loads(json.dumps(float("nan"))))
    with pytest.raises(MessageError):
        loads("{not json")


def test_the_io_nodes_packets_tell_binary_data_as_python_socketios_do():
    from socketio.packet import Packet

    from siocluster.transport import IoPacket

    samples = [None, 1, "text", b"bytes", bytearray(b"x"), [1, [2, {"a": b"deep"}]],
               {"a": [1, 2], "b": {"c": "d"}}, [[[[]]]], ("tuple", b"not looked into"),
               {"k": [{"x": bytearray(b"y")}]}]
    for data in samples:
        assert IoPacket.data_is_binary(data) == Packet.data_is_binary(data), data
