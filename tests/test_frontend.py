"""The frontend-node blueprint inside a Flask app of the test's own, with real io-nodes."""

import json

import pytest
from flask import Flask, url_for

from siocluster import Config, make_blueprint, make_frontend_server
from siocluster.frontend import CLIENT_CDN_URL
from tests.helpers import free_port, wait_until

SEED_IO_SERVERS = [
    {"internal": "10.1.2.3", "external": "chat.example.com", "port": 8081},
    {"internal": "io-2.cluster.internal", "external": "203.0.113.7", "port": 8082},
]


def flask_app(config=None, **options):
    app = Flask(__name__)
    app.testing = True          # an exception in a view fails the test instead of a 500
    return make_frontend_server(app, config, **options)


def read_js(response):
    """The object that ``/config.js`` assigns to ``window.SIOCLUSTER``."""
    body = response.get_data(as_text=True)
    head, sep, assigned = body.partition("window.SIOCLUSTER = ")
    assert sep, body
    return json.loads(assigned.strip().rstrip(";"))


def listed(client, path="/config.json", **kwargs):
    response = client.get(path, **kwargs)
    assert response.status_code == 200, response.get_data(as_text=True)
    return [(s["host"], s["port"]) for s in response.get_json()["ioServers"]]


def test_configured_io_nodes_are_listed_by_external_address_only():
    client = flask_app(Config(io_servers=SEED_IO_SERVERS)).test_client()
    expected = [
        {"host": "chat.example.com", "port": 8081, "url": "http://chat.example.com:8081"},
        {"host": "203.0.113.7", "port": 8082, "url": "http://203.0.113.7:8082"},
    ]

    js = client.get("/config.js")
    assert js.status_code == 200
    assert js.mimetype == "application/javascript"
    assert js.headers["Cache-Control"] == "no-store"
    assert read_js(js)["ioServers"] == expected

    as_json = client.get("/config.json")
    assert as_json.mimetype == "application/json"
    assert as_json.headers["Cache-Control"] == "no-store"
    assert as_json.get_json()["ioServers"] == expected

    for response in (js, as_json):
        body = response.get_data(as_text=True)
        assert "10.1.2.3" not in body and "io-2.cluster.internal" not in body


def test_seed_config_dict_and_its_client_config_url():
    client = flask_app({"IO_SERVERS": SEED_IO_SERVERS, "CLIENT_CONFIG_URL": "/cluster.js"}
                       ).test_client()
    assert read_js(client.get("/cluster.js"))["ioServers"][0]["host"] == "chat.example.com"
    assert listed(client, "/cluster.json") == [("chat.example.com", 8081), ("203.0.113.7", 8082)]
    assert client.get("/config.js").status_code == 404


def test_no_config_reads_the_flask_apps_siocluster_keys():
    app = Flask(__name__)
    app.config["SIOCLUSTER_IO_SERVERS"] = "10.9.9.9|io.example.org:9000"
    app.config["SIOCLUSTER_CLIENT_CONFIG_URL"] = "/io.js"
    make_frontend_server(app)
    client = app.test_client()
    assert listed(client, "/io.json") == [("io.example.org", 9000)]
    assert "10.9.9.9" not in client.get("/io.js").get_data(as_text=True)


def test_live_list_follows_io_nodes_starting_stopping_and_dying(cluster, config):
    client = flask_app(config).test_client()
    assert listed(client) == []

    a = cluster.io_node(public_host="io-a.example.com")
    b = cluster.io_node(public_host="io-b.example.com")
    port_a, port_b = a.address[1], b.address[1]
    assert listed(client) == sorted([("io-a.example.com", port_a), ("io-b.example.com", port_b)])
    for path in ("/config.js", "/config.json"):
        assert "127.0.0.1" not in client.get(path).get_data(as_text=True)   # their internal

    a.stop(timeout=3)
    assert listed(client) == [("io-b.example.com", port_b)]

    # death: the loops end without deregistering, so only the heartbeat's expiry tells
    b.stopping.set()
    b.join(2)
    assert b.id in b.state.nodes(alive=None)
    wait_until(lambda: listed(client) == [], timeout=config.node_ttl + 3,
               message="a dead io-node stayed listed")
    assert b.id in b.state.nodes(alive=None)       # still registered: it dropped out by TTL


def test_wildcard_external_host_becomes_the_host_the_browser_used(cluster, config):
    node = cluster.io_node(public_host="0.0.0.0")
    client = flask_app(config).test_client()
    response = client.get("/config.json", base_url="http://chat.example.net:8080/")
    assert response.get_json()["ioServers"] == [{
        "host": "chat.example.net", "port": node.address[1],
        "url": f"http://chat.example.net:{node.address[1]}"}]


def test_wildcard_configured_host_with_an_ipv6_request():
    client = flask_app(Config(io_servers=[{"internal": "10.1.2.3", "external": "::",
                                           "port": 8081}])).test_client()
    servers = read_js(client.get("/config.js", base_url="http://[::1]:5000/"))["ioServers"]
    assert servers == [{"host": "::1", "port": 8081, "url": "http://[::1]:8081"}]


def test_client_script_from_the_local_copy(tmp_path):
    (tmp_path / "socket.io.min.js").write_text("/* local Socket.IO client */")
    client = flask_app(Config(io_servers=SEED_IO_SERVERS), static_dir=str(tmp_path)).test_client()
    response = client.get("/socket.io.min.js")
    assert response.status_code == 200
    assert response.get_data(as_text=True) == "/* local Socket.IO client */"
    assert "javascript" in response.mimetype
    response.close()


def test_client_script_redirects_to_the_cdn_without_a_local_copy(tmp_path):
    client = flask_app(Config(io_servers=SEED_IO_SERVERS), static_dir=str(tmp_path)).test_client()
    response = client.get("/socket.io.min.js")
    assert response.status_code == 302
    assert response.headers["Location"] == CLIENT_CDN_URL


@pytest.mark.parametrize("where", ["register", "blueprint"])
def test_url_prefix(where):
    app = Flask(__name__)
    config = Config(io_servers=SEED_IO_SERVERS)
    if where == "register":
        app.register_blueprint(make_blueprint(config), url_prefix="/chat")
    else:
        app.register_blueprint(make_blueprint(config, url_prefix="/chat"))
    client = app.test_client()
    assert listed(client, "/chat/config.json")[0] == ("chat.example.com", 8081)
    assert read_js(client.get("/chat/config.js"))["ioServers"][1]["port"] == 8082
    assert client.get("/config.js").status_code == 404
    with app.test_request_context():
        assert url_for("siocluster.client_js") == "/chat/socket.io.min.js"


def test_unreachable_redis_gives_503_not_a_traceback():
    redis_port = free_port()      # nothing listens there
    client = flask_app(Config(redis_url=f"redis://127.0.0.1:{redis_port}/0")).test_client()

    js = client.get("/config.js")
    assert js.status_code == 503
    assert js.headers["Cache-Control"] == "no-store"
    body = js.get_data(as_text=True)
    assert body.startswith("// siocluster: the list of io-nodes is unavailable")
    assert read_js(js)["ioServers"] == []
    as_json = client.get("/config.json")
    assert as_json.status_code == 503
    assert "cannot reach Redis" in as_json.get_json()["error"]
    for text in (body, as_json.get_data(as_text=True)):
        assert "Traceback" not in text and str(redis_port) not in text


def test_an_io_node_serving_tls_is_listed_as_https(cluster, config):
    from siocluster.state import ClusterState, Keys

    state = ClusterState(config.redis_client(), Keys(config.prefix))
    state.heartbeat("io-node-tls", {"id": "io-node-tls", "role": "io-node", "port": 8443,
                                    "external": "chat.example.com", "tls": True}, 30)
    state.heartbeat("io-node-plain", {"id": "io-node-plain", "role": "io-node", "port": 8081,
                                      "external": "chat.example.com", "tls": False}, 30)
    client = flask_app(config).test_client()
    response = client.get("/config.json", base_url="http://chat.example.com:8080/")
    assert sorted(s["url"] for s in response.get_json()["ioServers"]) == [
        "http://chat.example.com:8081", "https://chat.example.com:8443"]


def test_the_live_list_gives_the_public_url_an_io_node_registered(cluster, config):
    """PUBLIC_URL: io-nodes behind a proxy, listed live (no IO_SERVERS to keep in step)."""
    io = cluster.io_node(public_url="wss://chat.example.com/io/1/socket.io/")
    plain = cluster.io_node()
    client = flask_app(config).test_client()
    wait_until(lambda: len(client.get("/config.json").get_json()["ioServers"]) == 2)
    servers = client.get("/config.json", base_url="http://chat.example.com/").get_json()
    proxied = [s for s in servers["ioServers"] if "path" in s]
    assert proxied == [{"host": "chat.example.com", "port": 443,
                        "url": "https://chat.example.com:443", "path": "/io/1/socket.io/"}]
    assert [s["port"] for s in servers["ioServers"] if "path" not in s] == [plain.address[1]]
    assert str(io.address[1]) not in json.dumps(proxied)          # internal never shown


def test_io_nodes_behind_a_proxy_are_listed_by_their_public_urls_and_paths():
    client = flask_app(Config(io_servers=[
        {"internal": "10.1.2.3:8081", "url": "wss://chat.example.com/io/1/socket.io/"},
        {"internal": "io-2.cluster.internal:8082", "url": "https://chat.example.com/io/2/"},
        {"internal": "10.1.2.4", "external": "0.0.0.0", "port": 8083},     # the older form
    ])).test_client()
    expected = [
        {"host": "chat.example.com", "port": 443, "url": "https://chat.example.com:443",
         "path": "/io/1/socket.io/"},
        {"host": "chat.example.com", "port": 443, "url": "https://chat.example.com:443",
         "path": "/io/2/"},
        {"host": "frontend.example.net", "port": 8083, "url": "http://frontend.example.net:8083"},
    ]
    # the URLs are given whole: the scheme and host of the request do not change them
    base = "http://frontend.example.net:8080/"
    js = client.get("/config.js", base_url=base)
    as_json = client.get("/config.json", base_url=base)
    assert read_js(js)["ioServers"] == expected
    assert as_json.get_json()["ioServers"] == expected
    for response in (js, as_json):
        body = response.get_data(as_text=True)
        for internal in ("10.1.2.3", "io-2.cluster.internal", "10.1.2.4", "8081", "8082"):
            assert internal not in body
