"""The example chat in a real headless Chromium, on a cluster started by the runner.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make browser-deps``; ``make test``
installs them). Selenium is given the system's chromedriver, so it never downloads one.
When the browser cannot start, the test fails and says why: it is never skipped.
"""

import os
import shutil
import signal
import tempfile

import pytest

from tests.helpers import free_port
from tests.test_run_cluster import Runner

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1000,800"]
WAIT = 20           # seconds for anything the page does


def start_chromium(user_data_dir):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        pytest.fail(f"selenium is missing ({exc}): install the test extra with `make install`")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None or not os.path.isfile(CHROMEDRIVER):
        pytest.fail(f"headless Chromium is not installed (chromium: {chromium}, chromedriver: "
                    f"{CHROMEDRIVER} {'found' if os.path.isfile(CHROMEDRIVER) else 'missing'}): "
                    "run `make browser-deps` (apt-get install chromium chromium-driver), or "
                    "`make test-fast` for every other test")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={user_data_dir}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})   # the console, on failure
    try:
        return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    except Exception as exc:
        pytest.fail(f"headless Chromium did not start: {exc.__class__.__name__}: {exc}\n"
                    f"Check that `{chromium} --headless --no-sandbox --dump-dom about:blank` "
                    "works here.")


@pytest.fixture
def browsers():
    """Start two headless Chromiums (two users, each with a profile of its own)."""
    started, dirs = [], []

    def start():
        dirs.append(tempfile.mkdtemp(prefix="siocluster-chromium-"))
        driver = start_chromium(dirs[-1])
        driver.set_page_load_timeout(WAIT)
        started.append(driver)
        return driver

    yield start
    for driver in started:
        try:
            driver.quit()
        except Exception:
            pass
    for path in dirs:
        shutil.rmtree(path, ignore_errors=True)


class Page:
    """One user's chat page."""

    def __init__(self, driver, url):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.by = driver, By
        self.wait = WebDriverWait(driver, WAIT, poll_frequency=0.05)
        driver.get(url)

    def find(self, css):
        return self.driver.find_element(self.by.CSS_SELECTOR, css)

    def texts(self, css):
        return [e.text for e in self.driver.find_elements(self.by.CSS_SELECTOR, css)]

    def status(self):
        node = self.find("#status")
        return node.get_attribute("data-state"), node.get_attribute("data-url"), node.text

    def until(self, condition, what):
        """Wait for ``condition()``; a timeout says what the page shows."""
        from selenium.common.exceptions import TimeoutException

        try:
            return self.wait.until(lambda _: condition())
        except TimeoutException:
            logs = self.driver.get_log("browser")
            raise AssertionError(
                f"the page did not show {what} within {WAIT}s: status {self.status()}, "
                f"error {self.find('#error').text!r}, members {self.texts('#members li')}, "
                f"messages {self.texts('#messages li')}, console {logs}") from None

    def connected_to(self, port):
        self.until(lambda: self.status()[0] == "connected"
                   and self.status()[1].endswith(f":{port}"), f"a connection to io-node {port}")

    def join(self, name, room):
        for field, value in (("name", name), ("room", room)):
            box = self.find(f'#join-form input[name="{field}"]')
            box.clear()
            box.send_keys(value)
        self.find("#join").click()
        self.until(lambda: self.find("#room").text == f"Room: {room}", f"room {room!r} joined")

    def send(self, text):
        self.find('#say-form input[name="text"]').send_keys(text)
        self.find("#send").click()
        self.until(lambda: self.find('#say-form input[name="text"]').get_attribute("value") == "",
                   f"{text!r} accepted")

    def messages(self):
        """(name, text) of each message shown, in order."""
        items = self.driver.find_elements(self.by.CSS_SELECTOR, "#messages li.message")
        return [(i.find_element(self.by.CSS_SELECTOR, ".name").text,
                 i.find_element(self.by.CSS_SELECTOR, ".text").text) for i in items]

    def shows_message(self, name, text):
        self.until(lambda: (name, text) in self.messages(), f"{name}'s message {text!r}")

    def shows_members(self, *names):
        self.until(lambda: self.texts("#members li") == list(names), f"members {list(names)}")


def test_two_users_chat_and_survive_an_io_node_kill(browsers):
    frontend, io_a, io_b = free_port(), free_port(), free_port()
    runner = Runner("--host", "127.0.0.1", "--frontend-port", str(frontend),
                    "--io-ports", f"{io_a} {io_b}", "--app-nodes", "2",
                    "--policy-port", str(free_port()))
    try:
        runner.wait_for(rf"^cluster\s+\| ready: open http://127\.0\.0\.1:{frontend}/")
        pids = runner.pids()

        # ?io= makes each page prefer one io-node, so the two users are on different ones
        alice = Page(browsers(), f"http://127.0.0.1:{frontend}/?io={io_a}")
        bob = Page(browsers(), f"http://127.0.0.1:{frontend}/?io={io_b}")
        alice.connected_to(io_a)
        bob.connected_to(io_b)

        alice.join("alice", "lobby")
        bob.join("bob", "lobby")
        alice.shows_members("alice", "bob")
        bob.shows_members("alice", "bob")

        alice.send("hello bob")
        bob.shows_message("alice", "hello bob")
        bob.send("hi alice <b>not bold</b>")
        alice.shows_message("bob", "hi alice <b>not bold</b>")   # text, never markup
        assert alice.messages() == bob.messages() == [
            ("alice", "hello bob"), ("bob", "hi alice <b>not bold</b>")]

        # bob's io-node dies: his page moves to the other io-node and joins the room again
        os.kill(pids[f"io-{io_b}"], signal.SIGKILL)
        alice.send("are you still there?")
        bob.connected_to(io_a)
        bob.shows_message("alice", "are you still there?")
        bob.shows_members("alice", "bob")
        alice.shows_members("alice", "bob")

        bob.send("yes, through the other io-node")
        alice.shows_message("bob", "yes, through the other io-node")
        alice.send("great")
        bob.shows_message("alice", "great")
        expected = [("alice", "hello bob"), ("bob", "hi alice <b>not bold</b>"),
                    ("alice", "are you still there?"), ("bob", "yes, through the other io-node"),
                    ("alice", "great")]
        assert alice.messages() == expected
        assert bob.messages() == expected           # each message once, in order
        assert alice.status()[1].endswith(f":{io_a}")
    finally:
        code = runner.stop()
    assert code == 0, runner.output
