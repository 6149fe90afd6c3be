"""Porting real apps: a python-socketio app and a Flask-SocketIO app hold the same conversation
on their own server in one process and, ported, on two io-nodes and two app-nodes; a
background task runs once per cluster and moves when its app-node dies; what cannot work
across processes says what to do instead."""

import importlib.util
import os
import signal
import subprocess
import sys
import time

import gevent
import pytest
import requests
import socketio
from gevent import pywsgi
from geventwebsocket.handler import WebSocketHandler

import siocluster
from siocluster.pages import pages_node
from siocluster.state import Keys
from siocluster.tasks import ClusterTask, start_cluster_task
from tests.conftest import ROOT
from tests.helpers import EventClient, wait_until

APPS = os.path.join(ROOT, "tests", "porting_apps")
FLASK_IMPORT = ("from flask_socketio import (", "from siocluster.flask_socketio import (")
# The conversations compared run on the cluster's defaults, connection-state recovery on:
# the test's clients (EventClient, siocluster.RecoveringClient) take off the offset it adds.
SIO_SERVER = [("import socketio\n", "import socketio\n\nimport siocluster\n"),
              ('sio = socketio.Server(async_mode="gevent")', "sio = siocluster.App()")]


# ---- running the original and the port -------------------------------------------------------

def port(tmp_path, name, swaps):
    """The app ``tests/porting_apps/<name>.py`` with ``swaps`` made (each once, each on
    one line: the whole port), written as module ``ported_<name>`` and imported."""
    with open(os.path.join(APPS, f"{name}.py")) as f:
        original = f.read()
    source = original
    for old, new in swaps:
        assert source.count(old) == 1, old
        assert "\n" not in old.rstrip("\n"), "a swap changes one line"
        source = source.replace(old, new)
    changed = set(source.splitlines()) ^ set(original.splitlines())
    assert len(changed) <= 2 * len(swaps) + 1     # the swapped lines, and a blank line
    module_name = f"ported_{name}"
    path = tmp_path / f"{module_name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def serve(wsgi_app):
    """The original: one gevent WSGI server in this process, on a free port."""
    server = pywsgi.WSGIServer(("127.0.0.1", 0), wsgi_app, handler_class=WebSocketHandler,
                               log=None)
    server.start()
    return server


def start_app_nodes(node_env, tmp_path, target, *flags, names=("app-A", "app-B")):
    """App-nodes as their users run them, one process each."""
    env = dict(node_env, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    procs = {}
    for name in names:
        with open(tmp_path / f"{name}.log", "w") as log:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "siocluster.appnode", target, "--node-id", name,
                 "--workers", "4", *flags], env=env, stdout=log, stderr=subprocess.STDOUT)
    return procs


def wait_alive(redis_client, prefix, names, procs, tmp_path):
    keys = Keys(prefix)

    def alive():
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited: {(tmp_path / f'{name}.log').read_text()}")
        return all(redis_client.exists(keys.alive(name)) for name in names)
    wait_until(alive, timeout=20, message="the app-nodes did not start")


def stop_processes(procs):
    for proc in procs.values():
        if proc.poll() is None:
            proc.terminate()
    for proc in procs.values():
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def connector(urls, clients):
    """connect(auth, n, namespaces): a client on the n-th server; a refusal is recorded."""
    def connect(auth, n, namespaces=("/",), refusals=None, headers=None):
        client = EventClient()
        clients.append(client)
        if refusals is not None:
            client.sio.on("connect_error", refusals.append)
        client.sio.connect(urls[n % len(urls)], transports=["websocket"], headers=headers,
                           namespaces=list(namespaces), auth=auth, wait_timeout=5)
        return client
    return connect


# ---- the conversations --------------------------------------------------------------------------

def flask_conversation(connect, url):
    """Ada and Bob on different servers: rooms, sessions, a catch-all, a class-based
    namespace, a background task both start, acks both ways, a server-side disconnect; and
    Cy, whose Socket.IO session starts with what a page put in her Flask session."""
    page = requests.get(url, timeout=5).text
    refusals, acks = [], []
    with pytest.raises(socketio.exceptions.ConnectionError):
        connect(None, 0, refusals=refusals)
    browser = requests.Session()
    assert browser.get(f"{url}/login/cy", timeout=5).text == "hello cy"
    cookie = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())
    cy = connect(None, 0, headers={"Cookie": cookie})
    cy.expect("welcome")
    ada = connect({"name": "ada"}, 0, namespaces=("/", "/echo"))
    bob = connect({"name": "bob"}, 1)
    ada.expect("welcome")
    bob.expect("welcome")
    acks.append(ada.call("join", "lobby"))
    acks.append(bob.call("join", "lobby"))
    ada.expect("joined")
    acks.append(ada.call("say", "hi"))
    bob.expect("said")
    bob.sio.emit("shout", "hey")
    ada.expect("shouted")
    bob.expect("shouted")
    bob.sio.emit("count")
    bob.sio.emit("count")
    bob.expect("counted", 2)
    acks.append(ada.call("dance", {"steps": 3}))              # the catch-all's
    ada.sio.send("plain words")
    ada.expect("message")
    acks.append(ada.call("divide", {"a": 1, "b": 0}))         # the error handler's
    ada.expect("failed")
    acks.append(ada.call("echo", "hello", namespace="/echo"))
    acks.append(ada.call("start_ticker", {"count": 3, "every": 0.2}))
    acks.append(bob.call("start_ticker", {"count": 3, "every": 0.2}))
    ada.expect("tick", 3)
    bob.expect("tick", 3)
    bob.sio.emit("leave", "lobby")
    ada.expect("left")
    acks.append(bob.call("join", "side"))
    ada.sio.emit("close room", "side")
    bob.expect("closing")
    acks.append(bob.call("join", "lobby"))
    ada.expect("joined", 2)
    ada.sio.emit("goodbye")
    ada.expect("bye")
    wait_until(lambda: "/" not in ada.sio.namespaces, message="ada was not disconnected")
    bob.expect("gone")
    gevent.sleep(0.5)          # anything more (a second ticker's ticks, say) would show
    return page, refusals, acks, ada.events, bob.events, cy.events


def sio_conversation(connect, get_page):
    """python-socketio's example conversation: rooms, broadcasts, a route that starts a
    background task, a server-side disconnect."""
    ada, bob = connect(None, 0), connect(None, 1)
    ada.expect("my_response")
    bob.expect("my_response")
    ada.sio.emit("my_event", {"data": "one"})
    ada.expect("my_response", 2)
    bob.sio.emit("my_broadcast_event", {"data": "to all"})
    ada.expect("my_response", 3)
    bob.expect("my_response", 2)
    ada.sio.emit("join", {"room": "r"})
    ada.expect("my_response", 4)
    bob.sio.emit("join", {"room": "r"})
    bob.expect("my_response", 3)
    acks = [bob.call("my_room_event", {"data": "to r", "room": "r"})]
    ada.expect("my_response", 5)
    bob.expect("my_response", 4)
    page = get_page()                                         # starts the background task
    ada.expect("my_response", 8)
    bob.expect("my_response", 7)
    bob.sio.emit("leave", {"room": "r"})
    bob.expect("my_response", 8)
    ada.sio.emit("close_room", {"room": "r"})
    ada.expect("my_response", 9)
    ada.sio.emit("disconnect_request")
    wait_until(lambda: not ada.sio.connected, message="ada was not disconnected")
    bob.expect("my_response", 9)
    gevent.sleep(0.5)
    return page, acks, ada.events, bob.events


# ---- the tests -------------------------------------------------------------------------------

def test_a_flask_socketio_app_ports_by_its_import_line(cluster, node_env, redis_client,
                                                        tmp_path):
    from tests.porting_apps import flask_chat

    clients = []
    server = serve(flask_chat.app)
    url = f"http://127.0.0.1:{server.address[1]}"
    try:
        before = flask_conversation(connector([url], clients), url)
    finally:
        for client in clients:
            client.close()
        server.stop(timeout=1)

    # the port: the import line, and how it runs (pages on the io-nodes, handlers on two
    # app-nodes in processes of their own, the background task once per cluster)
    ported = port(tmp_path, "flask_chat", [FLASK_IMPORT])
    procs = start_app_nodes(node_env, tmp_path,
                            "ported_flask_chat:socketio", "--background-tasks", "cluster")
    try:
        io_nodes = []
        for _ in range(2):
            node = pages_node(ported.app, cluster.config, ported)
            node.start()
            node.start_server(("127.0.0.1", 0))
            cluster.io_nodes.append(node)
            io_nodes.append(f"http://127.0.0.1:{node.address[1]}")
        wait_alive(redis_client, cluster.config.prefix, procs, procs, tmp_path)
        after = flask_conversation(connector(io_nodes, cluster.clients), io_nodes[1])
    finally:
        stop_processes(procs)

    assert after == before
    page, refusals, acks, ada_events, bob_events, cy_events = after
    assert cy_events[0] == ("/", "welcome", [{"name": "cy", "mode": "gevent"}])
    assert "gevent mode" in page
    assert refusals == [{"message": "who are you?"}]
    assert acks[0] == [{"rooms": ["lobby"], "own room": True}]
    assert acks[3] == ["caught dance"] and acks[4] == ["failed"] and acks[5] == [5]
    ticks = [("/", "tick", [{"n": n}]) for n in (1, 2, 3)]
    assert [e for e in ada_events if e[1] == "tick"] == ticks
    assert ("/", "bye", [{"name": "ada"}]) in ada_events
    assert bob_events[-1] == ("/", "gone", [{"name": "ada", "reason": "server disconnect"}])


def test_a_python_socketio_app_ports_by_the_line_that_makes_the_server(cluster, tmp_path):
    from tests.porting_apps import sio_example

    clients = []
    server = serve(sio_example.app)
    url = f"http://127.0.0.1:{server.address[1]}"

    def original(auth, n):
        return connector([url], clients)(auth, n)
    try:
        before = sio_conversation(original, lambda: requests.get(url, timeout=5).text)
    finally:
        for client in clients:
            client.close()
        server.stop(timeout=1)

    ported = port(tmp_path, "sio_example", SIO_SERVER)
    cluster.app_node(ported.sio)
    cluster.app_node(ported.sio)
    urls = []
    for _ in range(2):
        node = pages_node(ported.app, cluster.config, ported)
        node.start()
        node.start_server(("127.0.0.1", 0))
        cluster.io_nodes.append(node)
        urls.append(f"http://127.0.0.1:{node.address[1]}")
    connect = connector(urls, cluster.clients)
    after = sio_conversation(lambda auth, n: connect(auth, n),
                             lambda: requests.get(urls[0], timeout=5).text)

    assert after == before
    page, acks, ada_events, bob_events = after
    assert page == "<p>async_mode: gevent</p>" and acks == [["sent to r"]]
    assert bob_events[-1] == ("/", "my_response", [{"data": "Someone left: server disconnect"}])


def test_a_cluster_task_runs_once_and_moves_when_its_app_node_is_killed(cluster, node_env,
                                                                         redis_client,
                                                                         tmp_path):
    every, ttl, heartbeat = 0.2, 1.5, 0.3       # node_env's NODE_TTL and HEARTBEAT_INTERVAL
    io = cluster.io_node()
    procs = start_app_nodes(node_env, tmp_path, "tests.porting_apps.ticker:app",
                            "--background-tasks", "cluster")
    try:
        wait_alive(redis_client, cluster.config.prefix, procs, procs, tmp_path)
        clients = [cluster.client(io), cluster.client(io)]
        starters = set()
        for _ in range(50):          # until each app-node ran the handler that starts it
            for client in clients:
                starters.update(client.call("start", every))
            if len(starters) == 2:
                break
        assert starters == set(procs)
        clients[0].expect("tick", 6)
        ticks = [args[0] for args in clients[0].received("tick")]
        holder = ticks[0]["node"]
        assert {t["node"] for t in ticks} == {holder}
        assert [t["count"] for t in ticks] == list(range(ticks[0]["count"],
                                                         ticks[0]["count"] + len(ticks)))

        procs[holder].send_signal(signal.SIGKILL)
        procs[holder].wait(5)
        killed = time.monotonic()
        seen = len(ticks)
        wait_until(lambda: any(args[0]["node"] != holder
                               for args in clients[0].received("tick")[seen:]),
                   timeout=ttl + heartbeat + 5, message="no app-node took the task over")
        took = time.monotonic() - killed
        print(f"the task went on from another app-node {took:.2f}s after SIGKILL")
        clients[0].expect("tick", len(clients[0].received("tick")) + 3)
    finally:
        stop_processes(procs)

    # the lease lapses at most NODE_TTL after the last renewal, a standby tries every
    # HEARTBEAT_INTERVAL, and the task's first tick comes `every` after it starts
    assert took <= ttl + heartbeat + every + 0.5
    later = [args[0] for args in clients[0].received("tick")[seen:]]
    later = [t for t in later if t["node"] != holder]
    assert {t["node"] for t in later} == set(procs) - {holder}
    assert [t["count"] for t in later] == list(range(1, len(later) + 1))   # from the start


def test_a_finished_cluster_task_is_not_run_again_and_a_stopping_node_hands_it_over(cluster):
    app = siocluster.App()
    first, second = cluster.app_node(app), cluster.app_node(app)
    ran = []

    def once(tag):
        ran.append(tag)
        gevent.sleep(0.3)

    tasks = [start_cluster_task(node, ClusterTask("once", once, (node.id,), {}))
             for node in (first, second)]
    assert all(task.join(5) for task in tasks)
    assert len(ran) == 1                   # the standby stood down when it was done

    def forever():
        while True:
            ran.append("tick")
            gevent.sleep(0.05)

    loops = [start_cluster_task(node, ClusterTask("forever", forever, (), {}))
             for node in (first, second)]
    wait_until(lambda: any(task.running for task in loops))
    holder = next(task for task in loops if task.running)
    standby = next(task for task in loops if task is not holder)
    stopped = time.monotonic()
    holder.node.stop(timeout=2)
    wait_until(lambda: standby.running, timeout=3, message="the standby did not take over")
    # a graceful stop gives the lease up at once: the standby's next try takes it
    assert time.monotonic() - stopped < cluster.config.node_ttl
    assert holder.ended.is_set() and not holder.running


def test_what_cannot_work_across_processes_says_what_to_do(tmp_path):
    from werkzeug.test import Client

    ported = port(tmp_path, "flask_chat", [FLASK_IMPORT])
    assert ported.socketio.async_mode == siocluster.App.async_mode == "gevent"
    with pytest.raises(RuntimeError, match="siocluster.appnode .*:socketio"):
        ported.socketio.run(ported.app)
    # the Flask app alone, or socketio.WSGIApp around an App, serves no Socket.IO
    answer = Client(ported.app).get("/socket.io/?EIO=4&transport=polling")
    assert answer.status_code == 500 and b"siocluster.pages" in answer.data
    wrapped = socketio.WSGIApp(siocluster.App())
    answer = Client(wrapped).get("/socket.io/?EIO=4&transport=polling")
    assert answer.status_code == 500 and b"io-nodes" in answer.data

    from siocluster.flask_socketio import SocketIO, TravelledEnviron

    with pytest.raises(ValueError, match="manage_session"):
        SocketIO(ported.app, manage_session=False)
    with pytest.raises(KeyError, match="connect handler"):
        TravelledEnviron()["HTTP_X_TOKEN"]


def test_the_app_node_names_the_fix_for_another_librarys_server(node_env, tmp_path):
    source = ("import socketio, flask, flask_socketio\n"
              "sio = socketio.Server()\n"
              "socketio_ = flask_socketio.SocketIO(flask.Flask('x'))\n")
    (tmp_path / "foreign.py").write_text(source)
    env = dict(node_env, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    for target, fix in (("foreign:sio", "siocluster.App()"),
                        ("foreign:socketio_", "siocluster.flask_socketio")):
        done = subprocess.run([sys.executable, "-m", "siocluster.appnode", target], env=env,
                              capture_output=True, text=True, timeout=30)
        assert done.returncode != 0 and fix in done.stderr, done.stderr


def test_python_m_siocluster_pages_serves_the_pages_beside_socket_io(node_env, tmp_path):
    from tests.helpers import free_port

    port(tmp_path, "sio_example", SIO_SERVER)
    env = dict(node_env, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    # the original, unported, would serve pages whose routes emit to nobody: it says so
    refused = subprocess.run([sys.executable, "-m", "siocluster.pages",
                              "tests.porting_apps.sio_example:app"], env=env,
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "siocluster.App()" in refused.stderr, refused.stderr
    number = free_port()
    with open(tmp_path / "pages.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "siocluster.pages",
                                 "ported_sio_example:app", "--port", str(number)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{number}"

    def page():
        assert proc.poll() is None, (tmp_path / "pages.log").read_text()
        try:
            return requests.get(url, timeout=2)
        except requests.ConnectionError:
            return None
    try:
        assert wait_until(page, timeout=20).text == "<p>async_mode: gevent</p>"
        handshake = requests.get(f"{url}/socket.io/", params={"EIO": "4",
                                                              "transport": "polling"}, timeout=5)
        assert handshake.status_code == 200 and handshake.text.startswith("0{")
    finally:
        stop_processes({"pages": proc})


def test_a_siocluster_folder_that_hides_the_package_is_named_where_it_fails(tmp_path):
    (tmp_path / "siocluster").mkdir()           # a checkout's top directory, say
    (tmp_path / "chat.py").write_text("import siocluster\n\napp = siocluster.App()\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([sys.executable, "-c", "import siocluster; print(siocluster.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    if probe.returncode == 0 and probe.stdout.strip() != "None":
        pytest.skip("this install is not hidden by a folder (only editable installs are)")
    done = subprocess.run([sys.executable, "-m", "siocluster.appnode", "chat:app"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert "has no attribute 'App'" in done.stderr and "hides the installed package" in \
        done.stderr and str(tmp_path / "siocluster") in done.stderr, done.stderr


def test_a_process_that_only_emits_makes_its_socketio_with_message_queue(cluster):
    from siocluster.flask_socketio import SocketIO

    cluster.app_node(siocluster.App())
    client = cluster.client(cluster.io_node())
    # Flask-SocketIO's way for a worker or script to emit, without a Flask app
    external = SocketIO(message_queue=cluster.config.redis_url, channel=cluster.config.prefix)
    external.emit("news", {"headline": "ported"})
    assert client.expect("news") == [[{"headline": "ported"}]]


def test_each_nodes_help_lists_its_own_settings(capsys):
    from siocluster import appnode, pages

    for main, own, other in ((appnode.main, "--workers", "--max-connections"),
                             (pages.main, "--max-connections", "--workers")):
        with pytest.raises(SystemExit) as stopped:
            main(["--help"])
        assert stopped.value.code == 0
        shown = capsys.readouterr().out
        assert own in shown and other not in shown
        assert "--redis-url" in shown and "--background-tasks" in shown
    # another node's setting is still taken (one environment may serve several kinds)
    config, _ = siocluster.Config.load(["--workers", "3"], environ={}, role="io-node")
    assert config.workers == 3
    # every setting with a flag is some node's, and the tables name only settings
    from siocluster.config import COMMON_SETTINGS, ROLE_SETTINGS

    listed = COMMON_SETTINGS.union(*ROLE_SETTINGS.values())
    assert listed == set(siocluster.Config.setting_names()) - {"redis_options"}
