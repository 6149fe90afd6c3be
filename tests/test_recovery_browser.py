"""Connection-state recovery (socket.io 4.6+, issue 13) with the example chat page in a real
headless Chromium, on a cluster started by the runner.

In each scenario a listener page is in a room while another member (a python-socketio
client on an io-node that stays up) says "n=0", "n=1", ... at a steady rate, each one
acked, from before the listener's connection goes until after it is back:

- a. the page's transport drops (``socket.io.engine.close()``, a network blip);
- b. its io-node stops on SIGTERM and a successor starts on the same port;
- c. its io-node is killed (SIGKILL) and the page moves to the other io-node;
- d. the page stays away longer than the recovery window.

In a to c the page's one socket comes back as itself: the same id, ``socket.recovered``,
still in the room, every message shown once and in order, and the app never heard it leave.
In d it is a new client: a new id, not recovered, and the page joins its room again.

Needs what tests/test_browser.py needs (``make browser-deps``).
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import gevent
import pytest

from siocluster.cluster import frontend_origins
from tests.helpers import free_port, free_port_run, wait_until
from tests.test_browser import WAIT, Page, start_chromium
from tests.test_run_cluster import ROOT, Runner, browser_like, call

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(150)]

ROOM = "recovery"
RATE = 25              # messages a second from the sender
BEFORE = 20            # messages the page shows before its connection goes
AFTER = 20             # messages sent after the page is back, before the sender stops
SHORT_WINDOW = 3       # RECOVERY_WINDOW (s) of scenario d


class Process(Runner):
    """``python -m <module> <args>`` with SIOCLUSTER_* settings of the test's own (the
    runner passes its environment on to every node it starts), its output kept as Runner
    keeps the runner's."""

    def __init__(self, module, *args, settings=None):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIOCLUSTER_")}
        env.update(settings or {})
        env.update(PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args],
                                     cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []
        self.reader = gevent.spawn(self._read)


class Cluster:
    """The runner's cluster (embedded Redis, two io-nodes, two app-nodes), plus the io-nodes
    a test starts itself."""

    def __init__(self, settings=None, list_only_a=False):
        self.settings = dict(settings or {})
        self.frontend, self.io_a, self.io_b = free_port(), free_port(), free_port()
        if list_only_a:
            # /config.js lists io-node A alone, so a page waits for A's successor
            self.settings["SIOCLUSTER_IO_SERVERS"] = f"127.0.0.1:{self.io_a}"
        self.url = f"http://127.0.0.1:{self.frontend}"
        self.runner = Process("siocluster.cluster", "--host", "127.0.0.1",
                              "--frontend-port", str(self.frontend),
                              "--io-ports", f"{self.io_a} {self.io_b}", "--app-nodes", "2",
                              "--policy-port", str(free_port()),
                              "--app-port", str(free_port_run(2)), settings=self.settings)
        self.extra = []

    def wait_ready(self):
        self.runner.wait_for(rf"^cluster\s+\| ready: open {self.url}/")
        self.redis_url = self.runner.wait_for(
            r"embedded Redis at (redis://127\.0\.0\.1:\d+/0)").group(1)
        self.pids = self.runner.pids()

    def start_io_node(self, port):
        """An io-node of the same cluster on ``port``, started as the runner starts its own."""
        origins = ",".join(frontend_origins("127.0.0.1", self.frontend))
        node = Process("siocluster.ionode", "--host", "127.0.0.1", "--port", str(port),
                       "--cors-allowed-origins", origins,
                       settings={**self.settings, "SIOCLUSTER_REDIS_URL": self.redis_url})
        self.extra.append(node)
        node.wait_for(r"io-node \S+ listening on", timeout=30)
        return node

    def output(self, tail=None):
        """The nodes' lines (the last ``tail`` of the runner's only, when given)."""
        lines = self.runner.lines[-tail:] if tail else self.runner.lines
        for node in self.extra:
            lines = lines + ["--- the io-node the test started:"] + (
                node.lines[-tail:] if tail else node.lines)
        return "\n".join(lines)

    def stop(self):
        codes = [node.stop() for node in self.extra]
        return codes, self.runner.stop()


@pytest.fixture
def cluster():
    started = []

    def start(settings=None, list_only_a=False):
        started.append(Cluster(settings, list_only_a))
        started[-1].wait_ready()           # stopped at the end even if it never gets ready
        return started[-1]

    yield start
    for c in started:
        (extra_codes, code) = c.stop()
        print(c.output(tail=300))       # pytest shows it when the test failed
        assert code == 0 and all(x == 0 for x in extra_codes), c.output()


@pytest.fixture
def browser():
    profile = tempfile.mkdtemp(prefix="siocluster-chromium-")
    driver = start_chromium(profile)
    driver.set_page_load_timeout(WAIT)
    yield driver
    try:
        driver.quit()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


class Listener(Page):
    """The listener's chat page, read through window.chatSocket and window.chatState."""

    def js(self, script, *args):
        return self.driver.execute_script(script, *args)

    def state(self):
        return self.js("return Object.assign({recovered: window.chatSocket.recovered,"
                       " connected: window.chatSocket.connected}, window.chatState)")

    def texts(self, css):
        return self.js("return Array.from(document.querySelectorAll(arguments[0]),"
                       " (e) => e.textContent)", css)

    def messages(self):
        """(name, text) of each message shown, in order (one script, not a request each)."""
        return [tuple(m) for m in self.js(
            "return Array.from(document.querySelectorAll('#messages li.message'), (li) =>"
            " [li.querySelector('.name').textContent, li.querySelector('.text').textContent])")]

    def count(self):
        return self.js("return document.querySelectorAll('#messages li.message').length")

    def until(self, condition, what, timeout=WAIT):
        """Wait for ``condition()``; a timeout says what the page shows, in short."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                break
            gevent.sleep(0.05)
        shown = self.messages()
        numbers = [int(t[2:]) for n, t in shown if n == "sender" and t.startswith("n=")]
        missing = sorted(set(range(max(numbers, default=-1) + 1)) - set(numbers))
        raise AssertionError(
            f"the page did not show {what} within {timeout}s: status {self.status()}, "
            f"error {self.find('#error').text!r}, state {self.state()}, "
            f"members {self.texts('#members li')}, {len(shown)} messages (first {shown[:3]}, "
            f"last {shown[-3:]}, numbers missing {missing[:20]}, out of order "
            f"{numbers != sorted(numbers)}), notices {self.texts('#messages li.notice')}, "
            f"console {self.driver.get_log('browser')[-20:]}")


class Sender:
    """A member of the room that says "n=0", "n=1", ... RATE times a second, each acked."""

    def __init__(self, cluster, io_port):
        self.client = browser_like(cluster.frontend)
        self.client.sio.connect(f"http://127.0.0.1:{io_port}", transports=["websocket"],
                                wait_timeout=10)
        call(self.client, "join", {"name": "sender", "room": ROOM})
        self.sent = 0
        self.error = None
        self.stopping = False
        self.greenlet = None

    def start(self):
        self.greenlet = gevent.spawn(self._run)

    def _run(self):
        next_at = time.monotonic()
        while not self.stopping:
            try:
                answer = self.client.call("say", {"text": f"n={self.sent}"}, timeout=10)
            except Exception as exc:     # no ack in time: the test says so
                self.error = f"say n={self.sent}: {exc.__class__.__name__}: {exc}"
                return
            if not answer[0].get("ok"):
                self.error = f"say n={self.sent} refused: {answer}"
                return
            self.sent += 1
            next_at += 1 / RATE
            gevent.sleep(max(0.0, next_at - time.monotonic()))

    def wait_sent(self, count, timeout=30):
        wait_until(lambda: self.sent >= count or self.error, timeout=timeout,
                   message=f"the sender did not reach {count} messages (at {self.sent})")
        assert self.error is None, self.error

    def stop(self):
        """Stop the stream; returns how many messages were said."""
        self.stopping = True
        self.greenlet.join(timeout=15)
        assert self.error is None, self.error
        return self.sent

    def left(self, name):
        """The presence events this member got that say ``name`` left the room."""
        return [args[0] for args in self.client.received("presence")
                if args and isinstance(args[0], dict) and args[0].get("left") == name]

    def close(self):
        self.stopping = True
        if self.greenlet is not None:
            self.greenlet.kill()
        self.client.close()


@pytest.fixture
def senders():
    made = []

    def make(cluster, io_port):
        made.append(Sender(cluster, io_port))
        return made[-1]

    yield make
    for sender in made:
        sender.close()


def listener_in_room(c, browser, senders, io_port, sender_port):
    """The listener's page on ``io_port`` in the room with the sender, the stream on, the
    first messages shown; returns (page, sender, the page's first state)."""
    page = Listener(browser, f"{c.url}/?io={io_port}")
    page.connected_to(io_port)
    page.join("listener", ROOM)
    sender = senders(c, sender_port)
    page.shows_members("listener", "sender")
    first = page.state()
    assert first["sid"] and first["connects"] == 1, first
    sender.start()
    page.until(lambda: page.count() >= BEFORE, f"the first {BEFORE} messages")
    return page, sender, first


def recovered_with_nothing_missed(c, page, sender, first, to_port, sent_at_drop,
                                  meanwhile=None):
    """The checks of scenarios a to c, once the page's connection went (``sent_at_drop``
    messages had been said then)."""
    page.until(lambda: page.state()["connects"] == 2 and page.state()["connected"],
               "the page connected again", timeout=40)
    back = page.state()
    # the stream went on while the page was away (a reconnect takes 250 ms at least)
    assert sender.sent - sent_at_drop >= 3, (sent_at_drop, sender.sent)
    assert back["recovered"] is True, (back, c.output(tail=60))
    assert (back["sid"], back["recoveries"], back["rejoins"]) == (first["sid"], 1, 0), back
    assert back["url"].endswith(f":{to_port}"), back
    assert "session recovered, nothing missed" in page.status()[2]
    if meanwhile is not None:
        meanwhile()
    # the stream goes on a while after the reconnect, then stops
    sender.wait_sent(sender.sent + AFTER)
    count = sender.stop()
    page.until(lambda: ("sender", f"n={count - 1}") in page.messages(),
               f"the last message n={count - 1}")
    assert page.messages() == [("sender", f"n={i}") for i in range(count)]
    state = page.state()
    assert state["repeats"] == 0, state      # no `said` came twice either
    # still in the room, as itself
    call(sender.client, "say", {"text": "after recovery"})
    page.shows_message("sender", "after recovery")
    page.shows_members("listener", "sender")
    state = page.state()
    assert (state["sid"], state["connects"], state["rejoins"]) == (first["sid"], 2, 0), state
    assert sender.left("listener") == [], "the app heard the listener leave"


def test_a_transport_drop_is_recovered_with_nothing_missed(cluster, browser, senders):
    c = cluster()
    page, sender, first = listener_in_room(c, browser, senders, c.io_a, c.io_b)
    page.js("window.chatSocket.io.engine.close()")
    sent_at_drop = sender.sent
    # the page avoids the io-node it just lost, so it comes back through the other one
    recovered_with_nothing_missed(c, page, sender, first, c.io_b, sent_at_drop)


def test_b_sigterm_and_a_successor_on_the_same_port(cluster, browser, senders):
    c = cluster(list_only_a=True)
    page, sender, first = listener_in_room(c, browser, senders, c.io_a, c.io_b)
    old = c.pids[f"io-{c.io_a}"]
    os.kill(old, signal.SIGTERM)
    sent_at_drop = sender.sent
    c.runner.wait_for(rf"^cluster\s+\| io-{c.io_a} \(pid {old}\) (exited|was killed)",
                      timeout=30)
    successor = c.start_io_node(c.io_a)
    recovered_with_nothing_missed(c, page, sender, first, c.io_a, sent_at_drop)
    assert successor.proc.poll() is None, c.output()


def test_c_sigkill_and_the_page_moves_to_the_other_io_node(cluster, browser, senders):
    c = cluster()
    page, sender, first = listener_in_room(c, browser, senders, c.io_a, c.io_b)
    os.kill(c.pids[f"io-{c.io_a}"], signal.SIGKILL)
    sent_at_drop = sender.sent

    def reaped():
        # the reaper hands the dead io-node's clients to the app tier as disconnected: the
        # listener, back on B by now, must stay itself and in the room through that
        c.runner.wait_for(r"reaper on \S+: dead io-node \S+ held", timeout=40)

    recovered_with_nothing_missed(c, page, sender, first, c.io_b, sent_at_drop,
                                  meanwhile=reaped)


def test_d_away_longer_than_the_window_comes_back_as_a_new_client(cluster, browser, senders):
    c = cluster({"SIOCLUSTER_RECOVERY_WINDOW": str(SHORT_WINDOW)})
    page, sender, first = listener_in_room(c, browser, senders, c.io_a, c.io_b)
    gone_at = time.monotonic()
    page.js("const s = window.chatSocket; s.io.reconnection(false); s.io.engine.close();")
    page.until(lambda: not page.state()["connected"], "the page disconnected")
    # the window ends: the app tier hears the listener leave
    wait_until(lambda: sender.left("listener"), timeout=SHORT_WINDOW + 20,
               message="the sender never heard the listener leave")
    # away longer than the window: that is the scenario, not a wait for something
    gevent.sleep(max(0.0, gone_at + SHORT_WINDOW + 1 - time.monotonic()))
    page.js("const s = window.chatSocket; s.io.reconnection(true); s.connect();")

    page.until(lambda: page.state()["connects"] == 2 and page.state()["connected"],
               "the page connected again")
    back = page.state()
    assert not back["recovered"], back
    assert back["sid"] != first["sid"] and back["sid"], back
    assert (back["recoveries"], back["rejoins"]) == (0, 1), back
    page.until(lambda: "joined again" in page.status()[2], "the page joined again")
    page.shows_members("listener", "sender")
    # in the room again: the stream reaches the page as the new client
    sender.wait_sent(sender.sent + AFTER)
    count = sender.stop()
    page.shows_message("sender", f"n={count - 1}")
    call(sender.client, "say", {"text": "after coming back"})
    page.shows_message("sender", "after coming back")
    shown = page.messages()
    assert len(shown) == len(set(shown)), "a message shown twice"
    state = page.state()
    assert (state["sid"], state["connects"]) == (back["sid"], 2), state
