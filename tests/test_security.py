"""Nobody let in: origins, message sizes, Redis passwords, ACL users and TLS, rate limits,
and no unpickling anywhere."""

import ast
import os
import pathlib
import shutil
import subprocess
import sys
import time
import uuid

import gevent
import gevent.event
import gevent.queue
import pytest

from siocluster import App, Config
from siocluster.outbox import NOT_TEXT
from tests.conftest import Cluster, RedisServer
from tests.helpers import EventClient, free_port, handshake, wait_until, websocket_handshake

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "siocluster"


def echo_app(log=None):
    app = App()
    log = log if log is not None else []

    @app.on("echo")
    def echo(sid, data):
        log.append(data)
        return {"echo": data}

    return app, log


# ---- CORS -----------------------------------------------------------------------------------

def test_by_default_only_pages_of_the_io_nodes_own_host_may_connect(cluster):
    app, _ = echo_app()
    cluster.app_node(app)
    io = cluster.io_node()
    port = io.address[1]
    for origin in ("http://evil.example", f"http://127.0.0.1.evil.example:{port}", "null"):
        assert handshake(io, origin).status_code == 400
        assert websocket_handshake(io, origin) == 400
    # the frontend-node on the same host, another port; and clients that send no Origin
    assert handshake(io, "http://127.0.0.1:8080").status_code == 200
    assert websocket_handshake(io, "http://127.0.0.1:8080") == 101
    assert handshake(io).status_code == 200
    client = EventClient()
    client.sio.connect(f"http://127.0.0.1:{port}", transports=["polling"],
                       headers={"Origin": "http://127.0.0.1:8080"}, wait_timeout=5)
    try:
        assert client.call("echo", 1) == [{"echo": 1}]
    finally:
        client.close()


def test_configured_origins_are_the_only_ones_let_in(cluster):
    io = cluster.io_node(cors_allowed_origins="https://chat.example.com, https://m.example.com")
    for origin in ("https://chat.example.com", "https://m.example.com"):
        assert handshake(io, origin).status_code == 200
        assert websocket_handshake(io, origin) == 101
    for origin in ("http://chat.example.com", "http://127.0.0.1:8080", "http://evil.example"):
        assert handshake(io, origin).status_code == 400
        assert websocket_handshake(io, origin) == 400


# ---- sizes and text --------------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_an_oversized_message_is_refused_with_a_clear_error(cluster, transport):
    app, log = echo_app()
    cluster.app_node(app)
    io = cluster.io_node()
    client = cluster.client(io, transport=transport)
    big = "x" * 1_500_000
    [answer] = client.call("echo", big, timeout=10)
    assert answer["ok"] is False
    assert answer["error"].startswith("message too large: 1500")
    assert answer["error"].endswith("the limit is 1000000 bytes")
    assert client.expect("error")[0][0]["error"] == answer["error"]
    assert client.call("echo", "small") == [{"echo": "small"}]      # still connected
    assert log == ["small"]


def test_past_engine_io_hard_cap_the_connection_is_cut(cluster):
    app, log = echo_app()
    cluster.app_node(app)
    io = cluster.io_node(max_message_size=10_000)
    client = cluster.client(io)
    gone = gevent.event.Event()
    client.sio.on("disconnect", lambda *reason: gone.set())
    [answer] = client.call("echo", "x" * 20_000)        # over our limit: told
    assert answer["error"].startswith("message too large")
    client.sio.emit("echo", "x" * 200_000)              # over Engine.IO's: cut off
    assert gone.wait(5), "the connection survived a message over the hard cap"
    assert log == []


def test_text_that_is_not_utf8_is_refused_and_the_node_keeps_going(cluster):
    app, log = echo_app()
    cluster.app_node(app)
    io = cluster.io_node()
    client = cluster.client(io)
    assert client.call("echo", "lone \ud800 surrogate") == [{"ok": False, "error": NOT_TEXT}]
    assert client.call("echo", "fine") == [{"echo": "fine"}]
    assert log == ["fine"]


def test_nothing_in_siocluster_unpickles():
    """Data from Redis is JSON only: no module that can run code while loading is used."""
    forbidden_modules = {"pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle",
                         "jsonpickle", "yaml"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                names = [node.func.id] if node.func.id in ("eval", "exec") else []
            else:
                continue
            offenders += [f"{path.name}:{node.lineno} {name}" for name in names
                          if name.split(".")[0] in forbidden_modules | {"eval", "exec"}]
    assert offenders == []


# ---- Redis passwords, ACL users and TLS ---------------------------------------------------------

@pytest.fixture(scope="module")
def locked_redis():
    """A redis-server with a password for the default user and an ACL user alice."""
    server = RedisServer(extra_args=["--requirepass", "s3cret", "--user", "alice", "on",
                                     ">alice-pw", "~*", "&*", "+@all"]).start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


def _config(url, **options):
    return Config(redis_url=url, prefix=f"test-{uuid.uuid4().hex[:8]}", pop_timeout=0.2,
                  heartbeat_interval=0.3, node_ttl=1.5, workers=2, rate_limit=0, **options)


def _round_trip(config):
    cluster = Cluster(config)
    try:
        app, _ = echo_app()
        cluster.app_node(app)
        client = cluster.client(cluster.io_node())
        return client.call("echo", "through Redis")
    finally:
        cluster.stop()


def _start_error(config):
    app, _ = echo_app()
    cluster = Cluster(config)
    with pytest.raises(RuntimeError) as error:
        cluster.app_node(app)
    return str(error.value)


@pytest.mark.parametrize("auth", [":s3cret", "alice:alice-pw"])
def test_a_password_or_an_acl_user_works(locked_redis, auth):
    url = f"redis://{auth}@127.0.0.1:{locked_redis.port}/0"
    assert _round_trip(_config(url)) == [{"echo": "through Redis"}]


@pytest.mark.parametrize("auth", [":wrong", "alice:wrong", "mallory:alice-pw"])
def test_a_wrong_password_or_user_fails_at_start_saying_so(locked_redis, auth):
    error = _start_error(_config(f"redis://{auth}@127.0.0.1:{locked_redis.port}/0"))
    assert "refused the user or password" in error and "REDIS_URL" in error
    assert "wrong" not in error and "alice-pw" not in error     # no secret in the message


def test_a_missing_password_fails_at_start_saying_where_to_put_it(locked_redis):
    error = _start_error(_config(f"redis://127.0.0.1:{locked_redis.port}/0"))
    assert "needs a password" in error and "redis://:password@host:port/db" in error


def test_the_entry_point_reports_a_wrong_password_without_a_traceback(locked_redis):
    env = dict(os.environ, PYTHONPATH=str(ROOT),
               SIOCLUSTER_REDIS_URL=f"redis://:wrong@127.0.0.1:{locked_redis.port}/0")
    proc = subprocess.run([sys.executable, "-m", "siocluster.appnode", "tests.apps:echo"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "app-node: Redis at" in proc.stderr and "refused the user or password" in proc.stderr
    assert "Traceback" not in proc.stderr


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    """A redis-server that speaks TLS only, with a CA and a certificate made here."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: it makes the test's certificates")
    exe = shutil.which("redis-server")
    tmp = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
             "/CN=siocluster test CA", "-keyout", "ca.key", "-out", "ca.crt", cwd=tmp)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", "redis.key", "-out", "redis.csr", cwd=tmp)
    (tmp / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "redis.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "1", "-extfile", "san.ext", "-out", "redis.crt",
             cwd=tmp)
    port = free_port()
    proc = subprocess.Popen([exe, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--dir", str(tmp), "--tls-cert-file", "redis.crt",
                             "--tls-key-file", "redis.key", "--tls-ca-cert-file", "ca.crt",
                             "--tls-auth-clients", "no"],
                            cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: proc.poll() is not None or _listening(port), timeout=10,
                   message="the TLS redis-server did not listen")
        if proc.poll() is not None:
            out = proc.stdout.read()
            if "TLS" in out and ("not supported" in out or "Bad directive" in out):
                pytest.skip(f"this redis-server was built without TLS: {out.strip()[-200:]}")
            raise AssertionError(f"the TLS redis-server did not start:\n{out}")
        yield port, str(tmp / "ca.crt")
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


def _listening(port):
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_tls_to_redis_works(tls_redis):
    port, ca = tls_redis
    config = _config(f"rediss://127.0.0.1:{port}/0", redis_options={"ssl_ca_certs": ca})
    assert _round_trip(config) == [{"echo": "through Redis"}]


def test_tls_to_a_redis_whose_certificate_is_not_trusted_fails_at_start(tls_redis):
    port, _ = tls_redis
    error = _start_error(_config(f"rediss://127.0.0.1:{port}/0"))
    assert error.startswith(f"cannot reach Redis at rediss://127.0.0.1:{port}/0")
    assert "certificate verify failed" in error


# ---- rate limit -----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_flooding_client_is_throttled_and_the_others_round_trips_keep_completing(cluster):
    app, log = echo_app()
    cluster.app_node(app)
    rate, burst = 50, 20
    io = cluster.io_node(rate_limit=rate, rate_burst=burst)
    flooder, calm = cluster.client(io), cluster.client(io)
    stop = gevent.event.Event()
    sent = []

    def flood():
        while not stop.is_set():
            flooder.sio.emit("echo", "flood")
            sent.append(1)
            gevent.sleep(0.001)

    started = time.monotonic()
    flooding = gevent.spawn(flood)
    latencies = []
    try:
        for n in range(40):
            t0 = time.monotonic()
            assert calm.call("echo", n) == [{"echo": n}]
            latencies.append(time.monotonic() - t0)
            gevent.sleep(0.02)
    finally:
        stop.set()
        flooding.join(5)
    elapsed = time.monotonic() - started
    errors = flooder.expect("error", 1)
    assert errors[0][0] == {"event": "echo", "error": "rate limit exceeded, slow down"}
    wait_until(lambda: len(log) >= 40, message="the calm client's messages were not handled")
    handled = log.count("flood")
    allowed = burst + rate * elapsed
    assert len(sent) > allowed + 50            # the flood really was over the limit
    assert handled <= allowed + 5
    wait_until(lambda: len(flooder.received("error")) >= len(sent) - handled,
               message="not every refused message was answered with an error")
    latencies.sort()
    print(f"flood: {len(sent)} sent, {handled} let through in {elapsed:.1f}s; calm client's "
          f"round trips: median {latencies[len(latencies) // 2] * 1000:.0f} ms, "
          f"max {latencies[-1] * 1000:.0f} ms")
    assert latencies[len(latencies) // 2] < 0.25 and latencies[-1] < 1.0
