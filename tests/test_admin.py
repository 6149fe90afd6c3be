"""The Socket.IO Admin UI's protocol, cluster-wide (`app.instrument`).

An admin connects to the ``/admin`` namespace of one io-node and sees, and acts on, the
clients of every io-node: through python clients speaking the protocol, and once through
the official client in headless Chromium.
"""

import shutil
import tempfile
from pathlib import Path

import pytest
import socketio
from gevent import pywsgi

from siocluster import App
from siocluster.frontend import STATIC_DIR
from tests import test_browser
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(60)

AUTH = {"username": "admin", "password": "s3cret"}


def admin_app(**options):
    app = App()

    @app.on("echo")
    def echo(sid, data):
        return data

    app.instrument(**({"auth": AUTH} | options))
    return app


def admin_client(cluster, io, auth=AUTH):
    admin = cluster.client(io, connect=False)
    admin.sio.connect(f"http://127.0.0.1:{io.address[1]}", namespaces=["/admin"],
                      transports=["websocket"], auth=auth, wait_timeout=5)
    return admin


def sockets_of(admin):
    return {s["id"]: s for s in admin.expect("all_sockets", namespace="/admin")[0][0]}


def test_an_admin_sees_and_acts_on_the_clients_of_every_io_node(cluster):
    app = admin_app()
    io1, io2 = cluster.io_node(), cluster.io_node()
    cluster.app_node(app)
    cluster.app_node(app)
    a, b = cluster.client(io1), cluster.client(io2)
    assert a.call("echo", 1) == [1]

    admin = admin_client(cluster, io1)
    config = admin.expect("config", namespace="/admin")[0][0]
    assert {"EMIT", "JOIN", "LEAVE", "DISCONNECT", "ALL_EVENTS"} <= set(config["supportedFeatures"])
    listed = sockets_of(admin)
    assert set(listed) == {a.sid, b.sid}                     # both io-nodes' clients
    assert {listed[a.sid]["serverId"], listed[b.sid]["serverId"]} == {io1.id, io2.id}
    assert listed[b.sid]["nsp"] == "/" and listed[b.sid]["rooms"] == [b.sid]
    assert listed[a.sid]["handshake"]["address"] == "127.0.0.1"

    # what clients do reaches the admin, wherever they are
    assert b.call("echo", "hi") == ["hi"]
    received = admin.expect("event_received", namespace="/admin")[-1]
    assert received[:3] == ["/", b.sid, ["echo", "hi"]]
    c = cluster.client(io2)
    connected = admin.expect("socket_connected", namespace="/admin")[-1]
    assert connected[0]["id"] == c.sid and connected[0]["serverId"] == io2.id

    # and what the admin does reaches them: join, leave, emit, disconnect
    admin.sio.emit("join", ("/", "vip", b.sid), namespace="/admin")
    wait_until(lambda: app.rooms(b.sid) == [b.sid, "vip"], message="b did not join vip")
    joined = admin.expect("room_joined", namespace="/admin")[-1]
    assert joined[:3] == ["/", "vip", b.sid]
    admin.sio.emit("emit", ("/", "vip", "notice", "from the admin"), namespace="/admin")
    assert b.expect("notice") == [["from the admin"]] and a.received("notice") == []
    admin.sio.emit("leave", ("/", "vip", b.sid), namespace="/admin")
    wait_until(lambda: app.rooms(b.sid) == [b.sid], message="b did not leave vip")
    c_sid = c.sid
    admin.sio.emit("_disconnect", ("/", False, c_sid), namespace="/admin")
    wait_until(lambda: not c.sio.connected, message="c was not disconnected")
    gone = admin.expect("socket_disconnected", namespace="/admin")[-1]
    assert gone[:2] == ["/", c_sid]

    # each io-node's stats, from one app-node at a time
    stats = admin.expect("server_stats", 2, namespace="/admin", timeout=10)
    assert {s[0]["serverId"] for s in stats} == {io1.id, io2.id}
    by_node = {s[0]["serverId"]: s[0] for s in stats}
    assert by_node[io1.id]["clientsCount"] >= 1 and by_node[io1.id]["pid"] > 0


def test_the_admin_namespace_needs_its_credentials(cluster):
    io = cluster.io_node()
    cluster.app_node(admin_app())
    for wrong in ({"username": "admin", "password": "guess"}, None):
        with pytest.raises(socketio.exceptions.ConnectionError):
            admin_client(cluster, io, auth=wrong)
    with pytest.raises(ValueError, match="auth"):
        App().instrument()                         # no auth: refuses to start


def test_read_only_and_production_modes(cluster):
    app = admin_app(read_only=True, mode="production")
    io = cluster.io_node()
    cluster.app_node(app)
    client = cluster.client(io)
    admin = admin_client(cluster, io)
    features = admin.expect("config", namespace="/admin")[0][0]["supportedFeatures"]
    assert features == ["AGGREGATED_EVENTS"]
    admin.sio.emit("_disconnect", ("/", False, client.sid), namespace="/admin")
    assert client.call("echo", "still here") == ["still here"]
    assert admin.received("all_sockets", namespace="/admin") == []
    assert admin.received("event_received", namespace="/admin") == []


def test_auth_false_turns_authentication_off_explicitly(cluster):
    io = cluster.io_node()
    cluster.app_node(admin_app(auth=False))
    admin = admin_client(cluster, io, auth=None)
    assert admin.expect("config", namespace="/admin")


PAGE = """<!doctype html><meta charset="utf-8"><title>admin</title>
<script src="/socket.io.min.js"></script>
<script>
  window.admin = {sockets: null, stats: {}, error: null};
  const socket = io("http://127.0.0.1:%(port)d/admin",
                    {auth: %(auth)s, transports: ["websocket"], reconnection: false});
  socket.on("connect_error", (error) => { window.admin.error = String(error); });
  socket.on("all_sockets", (sockets) => {
    window.admin.sockets = sockets.map((s) => [s.id, s.serverId]);
  });
  socket.on("server_stats", (stats) => {
    window.admin.stats[stats.serverId] = stats.clientsCount;
  });
</script>
"""


@pytest.mark.browser
@pytest.mark.slow
def test_the_official_client_lists_the_sockets_of_two_io_nodes(cluster):
    from selenium.webdriver.support.ui import WebDriverWait

    client_js = (Path(STATIC_DIR) / "socket.io.min.js").read_bytes()
    pages = {}

    def serve(environ, start_response):
        if environ["PATH_INFO"] == "/socket.io.min.js":
            start_response("200 OK", [("Content-Type", "application/javascript")])
            return [client_js]
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
        return [pages["admin"].encode()]

    server = pywsgi.WSGIServer(("127.0.0.1", 0), serve, log=None)
    server.start()
    origin = f"http://127.0.0.1:{server.address[1]}"
    io1 = cluster.io_node(cors_allowed_origins=[origin])
    io2 = cluster.io_node(cors_allowed_origins=[origin])
    cluster.app_node(admin_app())
    same_origin = {"websocket_extra_options": {"origin": origin}}
    a, b = cluster.client(io1, **same_origin), cluster.client(io2, **same_origin)
    pages["admin"] = PAGE % {"port": io1.address[1],
                             "auth": '{"username": "admin", "password": "s3cret"}'}
    profile = tempfile.mkdtemp(prefix="siocluster-chromium-")
    driver = test_browser.start_chromium(profile)
    try:
        driver.get(origin + "/")
        state = lambda _=None: driver.execute_script("return window.admin")  # noqa: E731
        WebDriverWait(driver, test_browser.WAIT, poll_frequency=0.05).until(
            lambda _: state()["sockets"] is not None or state()["error"])
        assert state()["error"] is None, driver.get_log("browser")
        assert sorted(state()["sockets"]) == sorted([[a.sid, io1.id], [b.sid, io2.id]])
        WebDriverWait(driver, test_browser.WAIT, poll_frequency=0.05).until(
            lambda _: set(state()["stats"]) == {io1.id, io2.id})
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
        server.stop(timeout=1)
