"""siocluster behind nginx, as docs/deploy.md sets it up: Debian's nginx, started by the test on
a free port with deploy/nginx/siocluster.conf.template filled in for the test's ports and a
self-signed certificate, ends TLS in front of two io-nodes, each on a path of its own
(/io/1/, /io/2/), and of the frontend-node (on /), which lists the io-nodes by those URLs
(``IO_SERVERS`` with ``url``).

- python-socketio clients find the paths in /config.json and chat through both, over
  websocket and polling; the app sees the client's address and scheme as nginx sets them;
- the example chat page in headless Chromium (the official client) chats through both
  paths, and when its io-node stops it moves through nginx to the other path and comes back
  as itself (connection-state recovery);
- the deploy files hold what the docs say, and the systemd units' commands start, serve and
  drain within their TimeoutStopSec.

Needs nginx (``make proxy-deps``: scripts/install-system-deps nginx). When it is missing the
tests fail and say how to install it: they are never skipped.
"""

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests
from gevent import pywsgi

from example_chat.app import app as chat_app
from example_chat.frontend import create_app
from siocluster import App
from tests.conftest import ROOT
from tests.helpers import EventClient, free_port, wait_until
from tests.test_browser import browsers  # noqa: F401 (a fixture)
from tests.test_recovery_browser import Process
from tests.test_tls import certificate  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

DEPLOY = Path(ROOT) / "deploy"
TEMPLATE = DEPLOY / "nginx" / "siocluster.conf.template"
PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")
WAIT = 20

# nginx's main context for a private instance: every file in the test's folder
MAIN_CONF = """daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 512; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include {dir}/siocluster.conf;
}}
"""


def render(text, values):
    """The template with its ``${NAME}`` placeholders filled in, as envsubst does."""
    missing = set(PLACEHOLDER.findall(text)) - set(values)
    assert not missing, f"the template has placeholders the test does not fill: {missing}"
    return PLACEHOLDER.sub(lambda match: str(values[match.group(1)]), text)


def nginx_executable():
    exe = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if exe is None:
        pytest.fail("nginx is not installed, and this test runs siocluster behind it: run "
                    "`make proxy-deps` (scripts/install-system-deps nginx: apt-get install "
                    "nginx, as root or with sudo) or `sudo apt-get install nginx`. The test "
                    "starts an nginx of its own on a free port; no nginx service need run.")
    return exe


class Nginx:
    """A private nginx: the deploy template rendered for the test's ports, in a folder of
    its own, in the foreground."""

    def __init__(self, port, tls_files, frontend, io_nodes):
        self.exe = nginx_executable()
        self.port = port
        values = {"SERVER_NAME": "localhost", "LISTEN": self.port,
                  "TLS_CERTIFICATE": tls_files[0], "TLS_CERTIFICATE_KEY": tls_files[1],
                  "FRONTEND": frontend}
        values.update({f"IO_{n}": address for n, address in enumerate(io_nodes, 1)})
        rendered = render(TEMPLATE.read_text(), values)
        self.dir = tempfile.mkdtemp(prefix="siocluster-nginx-")
        os.chmod(self.dir, 0o755)      # nginx started as root runs its workers as another user
        Path(self.dir, "siocluster.conf").write_text(rendered)
        self.conf = Path(self.dir, "nginx.conf")
        self.conf.write_text(MAIN_CONF.format(dir=self.dir))
        self.proc = None

    def log(self):
        return Path(self.dir, "error.log").read_text(errors="replace")[-4000:] \
            if Path(self.dir, "error.log").exists() else ""

    def start(self):
        command = [self.exe, "-p", self.dir, "-c", str(self.conf), "-e",
                   str(Path(self.dir, "error.log"))]
        check = subprocess.run(command + ["-t"], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, f"nginx refused the rendered config:\n{check.stderr}"
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def listening():
            assert self.proc.poll() is None, f"nginx exited at start:\n{self.log()}"
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        wait_until(listening, timeout=10, interval=0.05, message="nginx did not listen")
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()          # fast shutdown: websockets do not hold it up
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


class Proxy:
    """nginx over TLS in front of two in-process io-nodes and the chat's frontend-node, which
    lists the io-nodes by their URLs on nginx."""

    def __init__(self, cluster, tls_files):
        self.cluster, self.tls_files = cluster, tls_files
        self.port = free_port()
        self.origin = f"https://127.0.0.1:{self.port}"
        self.frontend = self.nginx = None

    def start(self):
        self.io = [self.cluster.io_node(), self.cluster.io_node()]
        self.internal = [f"127.0.0.1:{node.address[1]}" for node in self.io]
        servers = [{"internal": internal, "url": f"wss://127.0.0.1:{self.port}/io/{n}/socket.io/"}
                   for n, internal in enumerate(self.internal, 1)]
        config = self.cluster.config.replace(io_servers=servers)
        self.frontend = pywsgi.WSGIServer(("127.0.0.1", 0), create_app(config), log=None)
        self.frontend.start()
        self.nginx = Nginx(self.port, self.tls_files,
                           f"127.0.0.1:{self.frontend.address[1]}", self.internal)
        self.nginx.start()
        return self

    def stop(self):
        if self.nginx is not None:
            self.nginx.stop()
        if self.frontend is not None:
            self.frontend.stop(timeout=1)


@pytest.fixture
def proxy(cluster, certificate):  # noqa: F811
    proxy = Proxy(cluster, certificate)
    try:
        yield proxy.start()
    finally:
        proxy.stop()


def https_session(certfile):
    session = requests.Session()
    # requests would trust REQUESTS_CA_BUNDLE from the environment over the session's own
    session.trust_env, session.verify = False, certfile
    return session


@contextlib.contextmanager
def client_through(server, transport, certfile, headers=None):
    """A python-socketio client on an io-node as /config.json lists it: ``io(url, {path})``."""
    session = https_session(certfile)
    client = EventClient(http_session=session)
    try:
        client.sio.connect(server["url"], socketio_path=server["path"], transports=[transport],
                           headers=headers or {}, wait_timeout=10)
        assert client.sio.transport() == transport
        yield client
    finally:
        client.close()
        session.close()


def forwarded_app():
    """Says what each client's connect saw of nginx's headers, and relays ``say``."""
    app = App()

    @app.event
    def connect(sid, environ, auth):
        app.save_session(sid, {key: environ.get(key) for key in (
            "HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_PROTO", "HTTP_HOST", "PATH_INFO")})

    @app.on("seen")
    def seen(sid, _=None):
        return app.get_session(sid)

    @app.on("say")
    def say(sid, text):
        app.emit("said", text)
        return {"ok": True}

    return app


def test_python_clients_chat_through_both_io_node_paths(proxy, certificate):  # noqa: F811
    proxy.cluster.app_node(forwarded_app())
    certfile = certificate[0]

    # the frontend-node on /, through nginx: the io-nodes by their public URLs only
    with https_session(certfile) as session:
        response = session.get(f"{proxy.origin}/config.json", timeout=10)
        page = session.get(f"{proxy.origin}/", timeout=10)
    assert response.status_code == 200, response.text
    servers = response.json()["ioServers"]
    assert servers == [{"host": "127.0.0.1", "port": proxy.port, "url": proxy.origin,
                        "path": f"/io/{n}/socket.io/"} for n in (1, 2)]
    assert not any(internal in response.text for internal in proxy.internal)
    assert page.status_code == 200 and "chat.js" in page.text
    # the io-nodes' own pages are not passed on (the frontend-node answers: not found)
    with https_session(certfile) as session:
        for path in ("/io/1/metrics", "/io/2/readyz"):
            assert session.get(f"{proxy.origin}{path}", timeout=10).status_code == 404, path

    # one client on each path, one over websocket and one over polling; the first says it
    # comes from elsewhere, which nginx overwrites with the address it saw
    with client_through(servers[0], "websocket", certfile,
                        headers={"X-Forwarded-For": "203.0.113.9"}) as alice, \
            client_through(servers[1], "polling", certfile) as bob:
        assert [len(node.clients) for node in proxy.io] == [1, 1]
        for client in (alice, bob):
            assert client.call("seen", timeout=10) == [{
                "HTTP_X_FORWARDED_FOR": "127.0.0.1", "HTTP_X_FORWARDED_PROTO": "https",
                "HTTP_HOST": "127.0.0.1", "PATH_INFO": "/socket.io/"}]
        assert alice.call("say", "from io-node 1", timeout=10) == [{"ok": True}]
        assert bob.call("say", "from io-node 2", timeout=10) == [{"ok": True}]
        for client in (alice, bob):
            said = sorted(args[0] for args in client.expect("said", 2, timeout=10))
            assert said == ["from io-node 1", "from io-node 2"]

    # nginx cuts a connection idle for proxy_read_timeout: it must outlast Engine.IO's
    # silence between pings, and a polling request held for the next packets
    eio = proxy.io[0].sio.eio
    quiet = eio.ping_interval + getattr(eio, "ping_interval_grace_period", 0) + eio.ping_timeout
    template = TEMPLATE.read_text()
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        seconds = int(re.search(rf"^\s*{directive} (\d+)s;", template, re.M).group(1))
        assert seconds > quiet, f"{directive} {seconds}s is not above {quiet}s"


@pytest.fixture
def tls_browsers(monkeypatch, browsers):  # noqa: F811
    """Headless Chromiums that accept the test's self-signed certificate."""
    from tests import test_browser

    monkeypatch.setattr(test_browser, "CHROMIUM_FLAGS",
                        test_browser.CHROMIUM_FLAGS + ["--ignore-certificate-errors"])
    return browsers


@pytest.mark.browser
@pytest.mark.timeout(150)
def test_the_chat_page_fails_over_from_one_nginx_path_to_the_other(proxy, tls_browsers):
    from tests.test_browser import Page

    proxy.cluster.app_node(chat_app)
    # ?io= makes each page prefer one io-node (by its path), so the two are on different ones
    alice = Page(tls_browsers(), f"{proxy.origin}/?io=/io/1/")
    bob = Page(tls_browsers(), f"{proxy.origin}/?io=/io/2/")

    def on(page, n):
        url = f"{proxy.origin}/io/{n}/socket.io/"
        page.until(lambda: page.status()[:2] == ("connected", url), f"a connection to {url}")

    def state(page):
        return page.driver.execute_script(
            "return Object.assign({transport: window.chatSocket.io.engine.transport.name},"
            " window.chatState)")

    on(alice, 1)
    on(bob, 2)
    # the handshake went by polling, then the upgrade through nginx to a websocket
    for page in (alice, bob):
        page.until(lambda page=page: state(page)["transport"] == "websocket", "a websocket")
    assert [len(node.clients) for node in proxy.io] == [1, 1]
    alice.join("alice", "lobby")
    bob.join("bob", "lobby")
    alice.shows_members("alice", "bob")
    alice.send("hello from io-node 1")
    bob.shows_message("alice", "hello from io-node 1")
    bob.send("hello from io-node 2")
    alice.shows_message("bob", "hello from io-node 2")

    # alice's io-node stops (SIGTERM's drain): her page moves through nginx to /io/2/
    before = state(alice)
    proxy.io[0].stop(timeout=5)
    on(alice, 2)
    after = state(alice)
    assert (after["sid"], after["recoveries"], after["rejoins"]) == (before["sid"], 1, 0), after
    assert after["connects"] == 2
    assert len(proxy.io[1].clients) == 2

    # and the chat goes on, both ways, each message shown once
    alice.send("still here, through /io/2/")
    bob.shows_message("alice", "still here, through /io/2/")
    bob.send("welcome over")
    alice.shows_message("bob", "welcome over")
    assert state(alice)["repeats"] == 0 and state(bob)["repeats"] == 0
    assert bob.status()[:2] == ("connected", f"{proxy.origin}/io/2/socket.io/")


# ---- the deploy files --------------------------------------------------------------------

# what each node does on SIGTERM at most, in seconds: its unit must wait longer
DRAIN = {"siocluster-io@.service": 10, "siocluster-app@.service": 10,
         "siocluster-frontend.service": 5}


def unit(name):
    """The ``key=value`` lines of a systemd unit (a key that repeats keeps its last)."""
    values = {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def env_file():
    values = {}
    for line in (DEPLOY / "systemd" / "siocluster.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def test_the_deploy_files_say_what_the_docs_say():
    docs = (Path(ROOT) / "docs" / "deploy.md").read_text()
    # the docs' nginx config is the template the tests run, word for word
    assert TEMPLATE.read_text().strip() in docs
    for name, drain in DRAIN.items():
        values = unit(name)
        assert values["KillSignal"] == "SIGTERM"
        assert int(values["TimeoutStopSec"].rstrip("s")) >= drain + 5, name
        assert values["Restart"] in ("always", "on-failure"), name
        assert values["ExecStart"].startswith("/opt/siocluster/venv/bin/python -m "), name
        assert values["EnvironmentFile"] == "/etc/siocluster/siocluster.env", name
        assert f"deploy/systemd/{name}" in docs
    compose = (DEPLOY / "compose.yaml").read_text()
    services = re.search(r"^services:\n(.*?)^\S", compose, re.M | re.S).group(1)
    assert re.findall(r"^  (\w+):$", services, re.M) == [
        "redis", "io1", "io2", "app1", "app2", "frontend", "nginx"]
    assert '"--appendonly", "yes"' in compose
    assert "stop_grace_period: 20s" in compose and "stop_signal: SIGTERM" in compose
    assert "./nginx/siocluster.conf.template:/etc/nginx/templates/" in compose
    assert "deploy/compose.yaml" in docs


def test_the_systemd_units_commands_serve_and_drain_in_time(config):
    """Each unit's ExecStart, run as systemd would (the environment file, the instance's
    port), serves; SIGTERM stops it, cleanly, within its TimeoutStopSec."""
    settings = dict(env_file(), SIOCLUSTER_REDIS_URL=config.redis_url,
                    SIOCLUSTER_PREFIX=config.prefix)
    ports, nodes = {}, {}
    try:
        for name, ready in (("siocluster-app@.service", r"metrics on http"),
                            ("siocluster-io@.service", r"io-node \S+ listening on"),
                            ("siocluster-frontend.service", r"frontend-node listening on")):
            args = unit(name)["ExecStart"].split()[1:]
            assert args[0] == "-m" and "--port" in args, args
            ports[name] = free_port()
            args[args.index("--port") + 1] = str(ports[name])      # %i, or the unit's own
            nodes[name] = Process(*args[1:], settings=settings)
            nodes[name].wait_for(ready, timeout=30)

        # the frontend-node lists the environment file's public URLs, not the io-node
        frontend = f"http://127.0.0.1:{ports['siocluster-frontend.service']}"
        listed = requests.get(f"{frontend}/config.json", timeout=10)
        assert [s["url"] + s["path"] for s in listed.json()["ioServers"]] == [
            f"https://chat.example.com:443/io/{n}/socket.io/" for n in (1, 2)]
        assert "127.0.0.1" not in listed.text
        # the app-node runs the chat: a client on the io-node joins a room
        client = EventClient()
        client.sio.connect(f"http://127.0.0.1:{ports['siocluster-io@.service']}",
                           transports=["polling"], wait_timeout=10)
        try:
            answer = client.call("join", {"name": "ops", "room": "deploy"}, timeout=10)[0]
            assert answer["ok"] and answer["members"] == ["ops"], answer
        finally:
            client.close()
    finally:
        failures = []
        for name in ("siocluster-io@.service", "siocluster-app@.service",
                     "siocluster-frontend.service"):
            if name not in nodes:
                continue
            limit = int(unit(name)["TimeoutStopSec"].rstrip("s"))
            started = time.monotonic()
            code = nodes[name].stop(signal.SIGTERM, timeout=limit)
            took = time.monotonic() - started
            if code != 0 or took >= limit:
                failures.append(f"{name}: exit {code} after {took:.1f}s:\n{nodes[name].output}")
    assert not failures, "\n".join(failures)
