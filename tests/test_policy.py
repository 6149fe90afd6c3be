"""The flash policy server, over real sockets on loopback, in-process and as `policy_server.py`."""

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import gevent
import pytest

from siocluster import Config, PolicyServer
from siocluster.policy import policy_xml
from tests.helpers import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
REQUEST = b"<policy-file-request/>\0"
ANSWER = (b'<cross-domain-policy><allow-access-from domain="*" to-ports="8081,8082"/>'
          b"</cross-domain-policy>\0")


@pytest.fixture
def start_server():
    """Start PolicyServers on a free loopback port; all are stopped after the test."""
    servers = []

    def start(ports=(8081, 8082), timeout=10.0, **kwargs):
        server = PolicyServer(("127.0.0.1", 0), ports=ports, timeout=timeout, **kwargs)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(timeout=1)


def exchange(address, *pieces, wait=5.0):
    """Send ``pieces`` one by one, then read until the server closes; returns what it sent."""
    with socket.create_connection(address[:2], timeout=wait) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in pieces:
            sock.sendall(piece)
        return read_until_closed(sock)


def read_until_closed(sock) -> bytes:
    received = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return received
            received += chunk
    except ConnectionResetError:
        # the server closed with our bytes unread: the kernel resets instead of closing
        return received


def test_policy_xml_lists_each_port_once_or_every_port():
    assert policy_xml([8081, 8082, 8081]) == ANSWER
    assert policy_xml([]).endswith(b'to-ports="*"/></cross-domain-policy>\0')


def test_answers_the_request_then_closes(start_server):
    server = start_server()
    with socket.create_connection(server.address[:2], timeout=5) as sock:
        sock.sendall(REQUEST)
        assert read_until_closed(sock) == ANSWER    # returns only once the server closed


def test_ports_come_from_io_servers_else_every_port_with_a_warning(start_server, caplog):
    config = Config(io_servers="a:8081,b|public-b:8082,c:8081")
    assert exchange(start_server(ports=None, config=config).address, REQUEST) == ANSWER

    with caplog.at_level(logging.WARNING, logger="siocluster.policy"):
        server = start_server(ports=None, config=Config())
    assert b'to-ports="*"' in exchange(server.address, REQUEST)
    assert "no io-node ports" in caplog.text


def test_silent_client_is_dropped_after_the_timeout(start_server):
    server = start_server(timeout=0.3)
    started = time.monotonic()
    with socket.create_connection(server.address[:2], timeout=5) as sock:
        assert read_until_closed(sock) == b""
    assert 0.3 <= time.monotonic() - started < 5


def test_a_client_sending_too_slowly_is_dropped_too(start_server):
    server = start_server(timeout=0.3)
    with socket.create_connection(server.address[:2], timeout=5) as sock:
        sock.sendall(REQUEST[:5])
        assert read_until_closed(sock) == b""


@pytest.mark.parametrize("junk", [
    b"GET / HTTP/1.1\r\nHost: example\r\n\r\n",
    b"<policy-file-request/>x\0",
    b"\0",
    b"<policy-file-request/><policy-file-request/>\0",
], ids=["http", "trailing-junk", "bare-nul", "twice"])
def test_junk_gets_nothing_and_is_closed_at_once(start_server, junk):
    server = start_server(timeout=30)    # closing must not wait for the timeout
    started = time.monotonic()
    assert exchange(server.address, junk) == b""
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("max_request, expected", [(64, b""), (256, ANSWER)],
                         ids=["cut-off-at-64", "answered-under-256"])
def test_a_request_over_the_size_limit_is_cut_off(start_server, max_request, expected):
    # whitespace around the request is tolerated, so only the size decides
    server = start_server(timeout=30, max_request=max_request)
    assert exchange(server.address, b" \r\n" * 40 + REQUEST) == expected


def test_a_request_split_over_several_sends_is_answered(start_server):
    server = start_server()
    with socket.create_connection(server.address[:2], timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(REQUEST[:9])
        sock.settimeout(0.2)
        with pytest.raises(socket.timeout):
            sock.recv(1)     # half a request: no answer yet, and the connection stays open
        sock.settimeout(5)
        for i in range(9, len(REQUEST), 5):
            sock.sendall(REQUEST[i:i + 5])
        assert read_until_closed(sock) == ANSWER


def test_many_concurrent_clients_are_all_answered(start_server):
    server = start_server()
    clients = [gevent.spawn(exchange, server.address, REQUEST[:10], REQUEST[10:])
               for _ in range(150)]
    gevent.joinall(clients, timeout=30, raise_error=True)
    assert [c.value for c in clients] == [ANSWER] * 150


# ---- policy_server.py, the entry point -----------------------------------------------------

def run_entry_point(*args, user_prefix=(), extra_env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIOCLUSTER_")}
    env.update(extra_env or {})
    return subprocess.Popen([*user_prefix, sys.executable, "policy_server.py", *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def answer_of(proc, port):
    assert proc.poll() is None, f"policy_server.py exited: {proc.communicate()}"
    try:
        return exchange(("127.0.0.1", port), REQUEST, wait=1)
    except ConnectionRefusedError:
        return None     # not listening yet


@pytest.mark.parametrize("args, env", [
    (["--allow-ports", "8081,8082"], {}),
    ([], {"SIOCLUSTER_IO_SERVERS": "127.0.0.1:8081,127.0.0.1:8082"}),
], ids=["allow-ports-flag", "io-servers-from-env"])
def test_entry_point_answers_and_stops_cleanly_on_sigterm(args, env):
    port = free_port()
    proc = run_entry_point("--port", str(port), *args, extra_env=env)
    try:
        assert wait_until(lambda: answer_of(proc, port), timeout=20) == ANSWER
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "stopping" in err


def test_entry_point_says_when_the_port_is_in_use():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_entry_point("--port", str(port), "--allow-ports", "8081")
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert f"127.0.0.1:{port} is already in use" in err and "--port" in err
    assert "Traceback" not in err


def unprivileged_prefix():
    """A command prefix that runs the rest as an unprivileged user (none when we are one)."""
    sysctl = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
    if sysctl.exists() and int(sysctl.read_text()) <= 843:
        pytest.skip("this machine lets every user bind port 843 "
                    "(net.ipv4.ip_unprivileged_port_start): no permission error to report")
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv"):
        return ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
    if shutil.which("su"):
        return ("su", "-s", "/bin/sh", "-c", 'exec "$0" "$@"', "nobody", "--")
    pytest.skip("tests run as root and neither setpriv nor su exists to drop privileges")


def test_entry_point_says_a_privileged_port_needs_root():
    proc = run_entry_point("--port", "843", "--allow-ports", "8081",
                           user_prefix=unprivileged_prefix())
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 1, err
    assert "port 843 is privileged" in err and "root" in err
    assert "CAP_NET_BIND_SERVICE" in err and "--port" in err
    assert "Traceback" not in err
