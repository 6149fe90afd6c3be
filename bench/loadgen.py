"""A load generator process: many Socket.IO clients in greenlets, driven by the bench.

The bench starts several of these (``python -m bench.loadgen``) so that the generator is
not the bottleneck. Each reads one JSON command per line on stdin and answers it with one
JSON line on stdout; its clients keep answering pings between commands::

    {"op": "connect", "group": "a", "urls": [...], "first": 0, "count": 100, "room_size": 10}
    {"op": "echo", "group": "a", "start_at": t, "warmup": 1, "duration": 5, "rate": 0}
    {"op": "fanout", "group": "a", "start_at": t, "warmup": 1, "duration": 5, "rate": 400,
     "step": 1}
    {"op": "connect", "group": "c", "urls": [...], "first": 0, "count": 100, "room_size": 10,
     "join": "chat"}
    {"op": "chat", "group": "c", "start_at": t, "warmup": 1, "duration": 5, "rate": 400,
     "step": 1}
    {"op": "quiet"}  {"op": "close", "group": "a"}  {"op": "quit"}

A group is the clients of one system: several systems can hold connected clients at once,
so the bench can measure them in turns while the others sit idle.

The clients are `RawClient`s: a websocket (websocket-client) speaking the Engine.IO v4 /
Socket.IO v5 text protocol directly. python-socketio's own client runs background
greenlets and queues per connection, which costs several times the CPU per message
(BENCHMARKS.md has the figures), and a generator busy with its clients measures itself.
Times that cross processes (a chat message's send time) are `time.time()`, the one wall
clock every process on the machine shares.
"""

if __name__ == "__main__":  # an entry point: patch before anything imports socket
    from gevent import monkey

    monkey.patch_all()

import json
import struct
import sys
import time
from typing import Callable, Dict, List, Optional

import gevent
import gevent.event
import gevent.lock
import gevent.pool
import websocket
from gevent.fileobject import FileObjectPosix

from bench.stats import Histogram
from bench.systems import raise_file_limit

ECHO_TEXT = "the quick brown fox jumps over the lazy dog"        # a short chat line
CHAT_TEXT = "hello room, this is a chat message of a typical length!"


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


class ProtocolError(RuntimeError):
    """The server answered something a websocket or Socket.IO v5 server does not."""


_NO_MASK = bytes(4)     # clients must mask; an all-zero key is a valid key that costs nothing


class WebSocket:
    """The client side of a websocket, lean enough not to measure itself.

    websocket-client does the opening handshake; frames are then read and written here:
    one ``recv`` per many frames (websocket-client makes two per frame), text frames as
    ``str``, pings answered, and a zero masking key.
    """

    __slots__ = ("sock", "_handshake", "_lock", "_buffer")

    def __init__(self, url: str, timeout: float):
        self._handshake = websocket.create_connection(
            url, timeout=timeout, suppress_origin=True, skip_utf8_validation=True)
        self.sock = self._handshake.sock
        self._lock = gevent.lock.Semaphore()
        self._buffer = bytearray()

    def settimeout(self, timeout: Optional[float]) -> None:
        self.sock.settimeout(timeout)

    def send(self, text: str, opcode: int = 0x1) -> None:
        data = text.encode() if isinstance(text, str) else text
        size = len(data)
        if size < 126:
            header = bytes((0x80 | opcode, 0x80 | size))
        elif size < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
        with self._lock:      # a frame must not be cut by another greenlet's
            self.sock.sendall(header + _NO_MASK + data)

    def messages(self):
        """Yield each text message as it arrives; ends when the server closes."""
        buffer, sock = self._buffer, self.sock
        fragments: List[bytes] = []
        while True:
            pos, end = 0, len(buffer)
            while end - pos >= 2:
                first, size = buffer[pos], buffer[pos + 1]
                if size & 0x80:
                    raise ProtocolError("the server masked a frame")
                head = 2
                if size == 126:
                    if end - pos < 4:
                        break
                    size, head = int.from_bytes(buffer[pos + 2:pos + 4], "big"), 4
                elif size == 127:
                    if end - pos < 10:
                        break
                    size, head = int.from_bytes(buffer[pos + 2:pos + 10], "big"), 10
                if end - pos < head + size:
                    break
                payload = bytes(buffer[pos + head:pos + head + size])
                pos += head + size
                opcode = first & 0x0F
                if opcode in (0x1, 0x0):
                    fragments.append(payload)
                    if first & 0x80:
                        text = b"".join(fragments).decode()
                        fragments = []
                        yield text
                elif opcode == 0x9:
                    self.send(payload, 0xA)
                elif opcode == 0x8:
                    return
            del buffer[:pos]
            chunk = sock.recv(65536)
            if not chunk:
                return
            buffer += chunk

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class RawClient:
    """One Socket.IO client on the default namespace over a `WebSocket`.

    ``on_event(client, text)`` gets every event packet (``42[...]``) as received; acks go
    to the callback given to `emit`.
    """

    __slots__ = ("index", "url", "room", "ws", "sid", "pending", "next_id", "reader",
                 "on_event", "closed")

    def __init__(self, index: int, url: str, on_event: Callable):
        self.index, self.url = index, url
        self.room: Optional[str] = None
        self.ws: Optional[WebSocket] = None
        self.sid = None
        self.pending: Dict[int, Callable] = {}
        self.next_id = 0
        self.reader = None
        self.on_event = on_event
        self.closed = False

    def connect(self, timeout: float) -> None:
        ws = self.ws = WebSocket(f"{self.url}/socket.io/?EIO=4&transport=websocket", timeout)
        messages = ws.messages()
        opening = next(messages)
        if not opening.startswith("0{"):
            raise ProtocolError(f"expected an Engine.IO open packet, got {opening[:80]!r}")
        ws.send("40")
        for message in messages:
            if message.startswith("40"):
                self.sid = json.loads(message[2:])["sid"]
                break
            if message.startswith("44"):
                raise ProtocolError(f"connection refused: {message[2:200]}")
            if message == "2":
                ws.send("3")
        else:
            raise ProtocolError("the server closed the connection during the connect")
        ws.settimeout(None)     # idle between commands: the server's pings keep it alive
        self.reader = gevent.spawn(self._read, messages)

    def _read(self, messages) -> None:
        pending = self.pending
        try:
            for message in messages:
                kind = message[:2]
                if kind == "43":
                    cut = message.index("[")
                    callback = pending.pop(int(message[2:cut]), None)
                    if callback is not None:
                        callback(message)
                elif kind == "42":
                    self.on_event(self, message)
                elif message == "2":
                    self.ws.send("3")
                elif message == "1" or kind == "41":
                    break
        except Exception:
            pass
        self.closed = True

    def emit(self, event: str, data, callback: Optional[Callable] = None) -> None:
        """Send an event; with ``callback(raw_ack)`` ask for an ack."""
        if callback is None:
            self.ws.send("42" + _dumps([event, data]))
            return
        self.next_id += 1
        self.pending[self.next_id] = callback
        self.ws.send(f"42{self.next_id}" + _dumps([event, data]))

    def call(self, event: str, data, timeout: float) -> str:
        """Emit and wait for the ack; returns its raw packet."""
        result = gevent.event.AsyncResult()
        self.emit(event, data, result.set)
        return result.get(timeout=timeout)

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
        if self.reader is not None:
            self.reader.kill(block=False)


class Generator:
    """The clients of this process and the commands the bench gives them."""

    def __init__(self):
        self.groups: Dict[str, List[RawClient]] = {}
        self.last_event = time.monotonic()
        self.fanning = None             # the fan-out step being measured, or None
        self.said = None             # the example chat's step being measured, or None

    # ---- connecting -----------------------------------------------------------------------

    def connect(self, urls, first, count, room_size=0, concurrency=100, timeout=30.0,
                group="default", join="room"):
        """Open ``count`` clients (global numbers from ``first``), spread over ``urls``;
        with ``room_size`` each joins room ``number // room_size``: ``join`` "room" by the
        bench's handler (``join "room-N"``), "chat" by the example chat's (``join {name,
        room}``, its ack ``{ok: true, ...}``)."""
        started = time.monotonic()
        errors: List[str] = []
        made: List[RawClient] = []

        def open_one(number):
            client = RawClient(number, urls[number % len(urls)], self._on_event)
            try:
                client.connect(timeout)
                if room_size:
                    client.room = f"room-{number // room_size}"
                    if join == "chat":
                        raw = client.call("join", {"name": f"user-{number}", "room": client.room},
                                          timeout)
                        answer = json.loads(raw[raw.index("["):])[0]
                        if not answer.get("ok"):
                            raise ProtocolError(f"join refused: {raw[:200]}")
                    else:
                        client.call("join", client.room, timeout)
            except (Exception, gevent.Timeout) as exc:      # a Timeout is no Exception
                client.close()
                errors.append(f"{exc.__class__.__name__}: {exc}")
                return
            made.append(client)

        pool = gevent.pool.Pool(concurrency)
        for number in range(first, first + count):
            pool.spawn(open_one, number)
        pool.join()
        self.groups.setdefault(group, []).extend(made)
        return {"connected": len(made), "failed": len(errors), "errors": errors[:3],
                "seconds": time.monotonic() - started}

    def close(self, group=None):
        """Close the clients of ``group`` (of every group when None)."""
        names = list(self.groups) if group is None else [group]
        alive = 0
        for name in names:
            for client in self.groups.pop(name, []):
                alive += not client.closed
                client.close()
        return {"closed": alive}

    def alive(self, group="default"):
        return {"alive": sum(1 for c in self.groups.get(group, []) if not c.closed)}

    # ---- echo: emit with an ack, wait for it ------------------------------------------------

    def echo(self, start_at, warmup, duration, rate=0.0, drain=5.0, timeout=10.0,
             group="default"):
        """Closed loop (``rate`` 0: each client waits for its ack before the next emit) or
        open loop at ``rate`` emits per second from this process. Only round trips begun
        in the window [start_at + warmup, + duration] count."""
        begin = start_at + warmup
        end = begin + duration
        hist = Histogram()
        counts = {"sent": 0, "acked": 0, "errors": 0}
        clock = time.time
        perf = time.perf_counter

        def record(sent_at, counted):
            def on_ack(_raw):
                if counted:
                    hist.add(perf() - sent_at)
                    counts["acked"] += 1
            return on_ack

        def closed_loop(client):
            n = 0
            while clock() < end and not client.closed:
                n += 1
                counted = clock() >= begin
                answer = gevent.event.AsyncResult()
                sent_at = perf()
                client.emit("echo", {"n": n, "text": ECHO_TEXT}, answer.set)
                if counted:
                    counts["sent"] += 1
                try:
                    answer.get(timeout=timeout)
                except gevent.Timeout:
                    counts["errors"] += 1
                    continue
                if counted:
                    hist.add(perf() - sent_at)
                    counts["acked"] += 1

        clients = self.groups.get(group, [])
        self._sleep_until(start_at)
        if rate <= 0:
            gevent.joinall([gevent.spawn(closed_loop, c) for c in clients])
        else:
            def send(client, n, now):
                counted = begin <= now < end
                if counted:
                    counts["sent"] += 1
                client.emit("echo", {"n": n, "text": ECHO_TEXT}, record(perf(), counted))
            self._paced(clients, rate, start_at, end, send)
            self._wait(lambda: counts["acked"] >= counts["sent"], end + drain)
        lost = counts["sent"] - counts["acked"]
        hist.add_lost(lost)
        return {**counts, "lost": lost, "hist": hist.to_json(), "duration": duration}

    # ---- chat fan-out: every member sends at a rate, the room gets each message -------------

    def fanout(self, start_at, warmup, duration, rate, step, drain=5.0, quiet=0.5,
               group="default"):
        """Every client sends ``chat`` to its room, ``rate`` messages per second from this
        process in all; deliveries of messages sent in the window are timed."""
        begin = start_at + warmup
        end = begin + duration
        chat = self.fanning = {"step": step, "begin": begin, "end": end, "hist": Histogram(),
                            "delivered": 0, "in_window": 0, "last": time.monotonic()}
        sent = {"window": 0, "all": 0}

        def send(client, n, now):
            sent["all"] += 1
            if begin <= now < end:
                sent["window"] += 1
            client.emit("chat", {"room": client.room, "ts": now, "step": step,
                                 "from": client.index, "text": CHAT_TEXT})

        self._paced(self.groups.get(group, []), rate, start_at, end, send)
        # then wait until deliveries stop (or the drain time is over)
        deadline = time.monotonic() + drain
        while time.monotonic() < deadline and time.monotonic() - chat["last"] < quiet:
            gevent.sleep(0.05)
        self.fanning = None
        return {"sent": sent["window"], "sent_all": sent["all"], "delivered": chat["delivered"],
                "delivered_in_window": chat["in_window"], "hist": chat["hist"].to_json(),
                "duration": duration}

    # ---- the example chat: every member says something at a rate, the room hears it -------

    def chat(self, start_at, warmup, duration, rate, step, drain=5.0, quiet=0.5,
             group="default"):
        """Every client sends ``say {text}`` (with an ack, as the chat's page does), ``rate``
        messages per second from this process in all; the text starts with the send time and
        the step (``"<time.time()> <step> hello room..."``), which each ``said`` received
        gives back: deliveries of messages sent in the window are timed."""
        begin = start_at + warmup
        end = begin + duration
        said = self.said = {"step": str(step), "begin": begin, "end": end, "hist": Histogram(),
                            "delivered": 0, "in_window": 0, "last": time.monotonic()}
        counts = {"sent": 0, "sent_all": 0, "acked": 0, "refused": 0}
        refusals: List[str] = []

        def on_ack(raw):
            answer = json.loads(raw[raw.index("["):])
            if answer and isinstance(answer[0], dict) and answer[0].get("ok") is True:
                counts["acked"] += 1
            else:
                counts["refused"] += 1
                if len(refusals) < 3:
                    refusals.append(raw[:200])

        def send(client, n, now):
            counts["sent_all"] += 1
            if begin <= now < end:
                counts["sent"] += 1
            client.emit("say", {"text": f"{now!r} {step} {CHAT_TEXT}"}, on_ack)

        self._paced(self.groups.get(group, []), rate, start_at, end, send)
        deadline = time.monotonic() + drain
        while time.monotonic() < deadline and time.monotonic() - said["last"] < quiet:
            gevent.sleep(0.05)
        self.said = None
        return {**counts, "unanswered": counts["sent_all"] - counts["acked"] - counts["refused"],
                "refusals": refusals, "delivered": said["delivered"],
                "delivered_in_window": said["in_window"], "hist": said["hist"].to_json(),
                "duration": duration}

    def _on_event(self, client, message):
        now = time.time()
        self.last_event = time.monotonic()
        if message.startswith('42["said"'):
            said = self.said
            if said is None:
                return
            sent_at, step, _ = json.loads(message[2:])[1]["text"].split(" ", 2)
            if step != said["step"]:
                return
            said["last"] = self.last_event
            if said["begin"] <= now < said["end"]:
                said["in_window"] += 1
            sent_at = float(sent_at)
            if said["begin"] <= sent_at < said["end"]:
                said["delivered"] += 1
                said["hist"].add(now - sent_at)
            return
        chat = self.fanning
        if chat is None or not message.startswith('42["chat"'):
            return
        data = json.loads(message[2:])[1]
        if data["step"] != chat["step"]:
            return
        chat["last"] = self.last_event
        if chat["begin"] <= now < chat["end"]:
            chat["in_window"] += 1
        if chat["begin"] <= data["ts"] < chat["end"]:
            chat["delivered"] += 1
            chat["hist"].add(now - data["ts"])

    def quiet(self, quiet=0.5, limit=60.0):
        """Wait until no event has arrived for ``quiet`` seconds: the last step's backlog
        is gone."""
        started = time.monotonic()
        while time.monotonic() - self.last_event < quiet and time.monotonic() - started < limit:
            gevent.sleep(0.05)
        return {"waited": time.monotonic() - started}

    # ---- helpers ----------------------------------------------------------------------------

    def _paced(self, clients, rate, start_at, end, send):
        """Call ``send(client, n, now)`` ``rate`` times per second from ``start_at`` to
        ``end``, round robin over the clients. Late sends go out at once (no catch-up
        sleeping), so a slow server shows as fewer sends, not as a burst."""
        clients = [c for c in clients if not c.closed]
        if not clients or rate <= 0:
            return
        interval = 1.0 / rate
        self._sleep_until(start_at)
        n = 0
        next_at = start_at
        while True:
            now = time.time()
            if now >= end:
                break
            if next_at > now + 0.001:
                gevent.sleep(next_at - now)
                continue
            send(clients[n % len(clients)], n, now)
            n += 1
            next_at += interval
            if n % 64 == 0:
                gevent.sleep(0)      # let the readers run between bursts

    @staticmethod
    def _sleep_until(wall_time):
        delay = wall_time - time.time()
        if delay > 0:
            gevent.sleep(delay)

    @staticmethod
    def _wait(predicate, deadline):
        while not predicate() and time.time() < deadline:
            gevent.sleep(0.02)


def main() -> None:
    raise_file_limit()
    generator = Generator()
    stdin = FileObjectPosix(sys.stdin.fileno(), "rb", close=False)
    for line in stdin:
        command = json.loads(line)
        op = command.pop("op")
        if op == "quit":
            break
        try:
            reply = getattr(generator, op)(**command)
        except Exception as exc:
            reply = {"error": f"{op}: {exc.__class__.__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    generator.close()


if __name__ == "__main__":
    main()
