"""The io-node serving https and wss itself (CERTFILE, KEYFILE), and under gunicorn's
--certfile: python-socketio's client on both transports, the official client in Chromium."""

import contextlib
import shutil
import socket
import ssl
import subprocess
import sys

import pytest
import requests

from siocluster import App
from tests.conftest import ROOT
from tests.helpers import EventClient, free_port, wait_until
from tests.test_entrypoints import Process, _live, gunicorn_io_node
from tests.test_limits import closed_by_server
from tests.test_security import _openssl


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and localhost: (certfile, keyfile)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: it makes the test's certificate")
    tmp = tmp_path_factory.mktemp("io-tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
             "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
             "-keyout", "io.key", "-out", "io.crt", cwd=tmp)
    return str(tmp / "io.crt"), str(tmp / "io.key")


def chat_app():
    app = App()

    @app.on("say")
    def say(sid, text):
        app.emit("said", {"from": sid, "text": text})
        return {"ok": True, "text": text}

    return app


@contextlib.contextmanager
def tls_client(port, transport, certfile):
    """A python-socketio client over https that trusts the self-signed ``certfile``."""
    session = requests.Session()
    # requests would trust REQUESTS_CA_BUNDLE from the environment over the session's own
    session.trust_env, session.verify = False, certfile
    client = EventClient(http_session=session)
    try:
        client.sio.connect(f"https://127.0.0.1:{port}", transports=[transport],
                           wait_timeout=10)
        assert client.sio.transport() == transport
        yield client
    finally:
        client.close()
        session.close()     # python-socketio leaves a session of ours open


def round_trip(port, certfile):
    """An ack and a broadcast through a websocket client and a polling one."""
    with tls_client(port, "websocket", certfile) as ws, \
            tls_client(port, "polling", certfile) as polling:
        for client in (ws, polling):
            text = f"over {client.sio.transport()}"
            assert client.call("say", text, timeout=10) == [{"ok": True, "text": text}]
        for client in (ws, polling):
            said = [args[0]["text"] for args in client.expect("said", 2, timeout=10)]
            assert sorted(said) == ["over polling", "over websocket"]


def echo_through(port, certfile):
    for transport in ("websocket", "polling"):
        with tls_client(port, transport, certfile) as client:
            assert client.call("echo", transport, timeout=10)[0]["echo"] == transport


def test_the_io_node_serves_https_and_wss(cluster, certificate):
    certfile, keyfile = certificate
    io = cluster.io_node(certfile=certfile, keyfile=keyfile)
    cluster.app_node(chat_app())
    round_trip(io.address[1], certfile)
    assert io.info()["tls"] is True
    # nothing but TLS on that port: a clear-text request is not answered as one
    with socket.create_connection(io.address[:2], timeout=5) as sock:
        sock.sendall(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n\r\n")
        assert not sock.recv(4096).startswith(b"HTTP/1.1 200")


def test_a_missing_certificate_stops_the_io_node_saying_which_file(config, node_env, tmp_path):
    missing = tmp_path / "nowhere.crt"
    proc = subprocess.run([sys.executable, "-m", "siocluster.ionode", "--port", str(free_port()),
                           "--certfile", str(missing), "--keyfile", str(missing)],
                          cwd=ROOT, env=node_env, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert str(missing) in proc.stderr, proc.stderr


def test_python_m_ionode_with_certfile(config, node_env, certificate):
    certfile, keyfile = certificate
    port = free_port()
    io = Process([sys.executable, "-m", "siocluster.ionode", "--port", str(port),
                  "--certfile", certfile, "--keyfile", keyfile], node_env)
    app = Process([sys.executable, "-m", "siocluster.appnode", "tests.apps:echo"], node_env)
    try:
        wait_until(lambda: _live(config, "io-node") and _live(config, "app-node"), timeout=20,
                   message="nodes did not register")
        echo_through(port, certfile)
        assert [n.get("tls") for n in _live(config, "io-node").values()] == [True]
    finally:
        io_code, io_out = io.stop()
        app.stop()
    assert io_code == 0, io_out


def test_gunicorn_with_certfile(config, node_env, certificate):
    pytest.importorskip("gunicorn")
    certfile, keyfile = certificate
    port = free_port()
    gunicorn = gunicorn_io_node(port, node_env, "--certfile", certfile, "--keyfile", keyfile)
    app = Process([sys.executable, "-m", "siocluster.appnode", "tests.apps:echo"], node_env)
    try:
        wait_until(lambda: _live(config, "app-node"), timeout=20, message="no app-node")
        wait_until(lambda: gunicorn.proc.poll() is not None or _tls_answers(port), timeout=20,
                   message="gunicorn did not listen")
        assert gunicorn.proc.poll() is None, gunicorn.stop()[1]
        echo_through(port, certfile)
    finally:
        gunicorn_code, gunicorn_out = gunicorn.stop()
        app.stop()
    assert gunicorn_code == 0, gunicorn_out


def _tls_answers(port):
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock, \
                context.wrap_socket(sock):
            return True
    except OSError:
        return False



def test_the_tls_handshake_is_under_the_handshake_timeout_and_the_caps(cluster, certificate):
    certfile, keyfile = certificate
    io = cluster.io_node(certfile=certfile, keyfile=keyfile, handshake_timeout=0.5,
                         max_connections=1)
    with socket.create_connection(io.address[:2], timeout=5) as stalled:
        stalled.sendall(b"\x16\x03\x01")        # the start of a ClientHello, never finished
        wait_until(lambda: io._server.connections == 1, message="the connection not counted")
        # past the cap, a TLS connection is closed with no handshake spent on it
        with socket.create_connection(io.address[:2], timeout=5) as refused:
            assert closed_by_server(refused)
        assert closed_by_server(stalled), "a stalled TLS handshake was kept"
