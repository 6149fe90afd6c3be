"""What operators see: every node's Prometheus metrics, /healthz and /readyz.

Metrics are read over HTTP and parsed with prometheus-client's own parser; each moves as
its event happens.
"""

import gevent
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from siocluster import App
from tests.helpers import free_port, wait_until

pytestmark = pytest.mark.timeout(60)


def scrape(url: str) -> dict:
    """``{(name, labels as a sorted tuple): value}`` of every sample at ``url``."""
    response = requests.get(url, timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def observed_app():
    app = App()

    @app.on("echo")
    def echo(sid, data):
        return data

    @app.on("boom")
    def boom(sid, data):
        raise ValueError("boom")

    @app.on("slow")
    def slow(sid, seconds):
        gevent.sleep(seconds)
        return "done"

    return app


def test_io_node_and_app_node_metrics_move_as_things_happen(cluster):
    io = cluster.io_node()
    app_node = cluster.app_node(observed_app(), max_attempts=2)
    app_port = free_port()
    app_node.serve_http(("127.0.0.1", app_port))
    io_url = f"http://127.0.0.1:{io.address[1]}/metrics"
    app_url = f"http://127.0.0.1:{app_port}/metrics"

    before = scrape(io_url)
    assert value(before, "siocluster_node_info", version=__import__("siocluster").__version__,
                 kind="io-node", id=io.id) == 1
    assert value(before, "siocluster_redis_up") == 1
    assert value(before, "siocluster_connects_total") == 0
    assert value(before, "siocluster_redis_roundtrip_seconds_count") >= 1

    client = cluster.client(io)
    assert client.call("echo", "hi") == ["hi"]
    client.sio.emit("no-client", "x")                # a reserved name: refused
    client.expect("error")
    client.sio.emit("nobody-handles-this", "x")      # taken, no handler
    client.sio.emit("boom", 1)                       # retried, then dead-lettered
    wait_until(lambda: value(scrape(app_url), "siocluster_dead_letters_total") == 1,
               timeout=10)

    io_now, app_now = scrape(io_url), scrape(app_url)
    assert value(io_now, "siocluster_connects_total") == 1
    assert value(io_now, "siocluster_clients") == 1
    assert value(io_now, "siocluster_connections", transport="websocket") == 1
    assert value(io_now, "siocluster_events_in_total") == 3
    assert value(io_now, "siocluster_refusals_total", what="event", reason="reserved") == 1
    assert value(io_now, "siocluster_commands_applied_total") >= 2      # verdict, ack
    assert value(io_now, "siocluster_outbox_messages") == 0
    assert ("siocluster_command_stream_lag_seconds", ()) in io_now
    assert value(io_now, "siocluster_inbox_messages") == 0
    assert value(app_now, "siocluster_messages_handled_total", kind="connect") == 1
    assert value(app_now, "siocluster_messages_handled_total", kind="event") == 2
    assert value(app_now, "siocluster_handler_seconds_count", event="echo") == 1
    assert value(app_now, "siocluster_handler_seconds_count", event="(other)") == 1
    assert value(app_now, "siocluster_handler_seconds_bucket", event="echo", le="+Inf") == 1
    assert value(app_now, "siocluster_retries_total") == 1
    assert value(app_now, "siocluster_dead_letters_total") == 1
    assert value(app_now, "siocluster_messages_in_flight") == 0
    assert value(app_now, "siocluster_node_info", version=__import__("siocluster").__version__,
                 kind="app-node", id=app_node.id) == 1

    client.sio.disconnect()
    wait_until(lambda: value(scrape(io_url), "siocluster_disconnects_total", how="left") == 1)
    other = cluster.client(io)
    other.sio.eio.ws.sock.shutdown(2)                # a drop: parked for it to come back
    wait_until(lambda: value(scrape(io_url), "siocluster_disconnects_total", how="parked") == 1)
    assert value(scrape(io_url), "siocluster_clients") == 0


def test_readyz_follows_redis_and_draining(own_cluster, durable_redis):
    io = own_cluster.io_node()
    app_node = own_cluster.app_node(observed_app())
    app_port = free_port()
    app_node.serve_http(("127.0.0.1", app_port))
    io_base = f"http://127.0.0.1:{io.address[1]}"
    app_base = f"http://127.0.0.1:{app_port}"
    for base in (io_base, app_base):
        assert requests.get(base + "/healthz", timeout=5).json()["ok"] is True
        ready = requests.get(base + "/readyz", timeout=5)
        assert ready.status_code == 200 and ready.json()["ready"] is True, ready.text

    durable_redis.stop()
    for base in (io_base, app_base):
        answer = requests.get(base + "/readyz", timeout=5)
        assert answer.status_code == 503 and answer.json()["checks"]["redis"]["ok"] is False
        assert requests.get(base + "/healthz", timeout=5).status_code == 200   # still alive
    durable_redis.start()
    for base in (io_base, app_base):
        wait_until(lambda b=base: requests.get(b + "/readyz", timeout=5).status_code == 200,
                   timeout=15, message=f"{base} did not become ready again")

    # an app-node draining (SIGTERM, a handler still running) is not ready
    client = own_cluster.client(io)
    client.sio.emit("slow", 2)
    wait_until(lambda: app_node._busy == 1, timeout=5)
    stopping = gevent.spawn(app_node.stop, 5)
    answer = requests.get(app_base + "/readyz", timeout=5)
    assert answer.status_code == 503 and answer.json()["checks"]["draining"]["ok"] is False
    stopping.join(10)


def test_metrics_paths_answer_get_only_and_other_paths_go_to_socketio(cluster):
    io = cluster.io_node()
    base = f"http://127.0.0.1:{io.address[1]}"
    assert requests.post(base + "/metrics", timeout=5).status_code == 405
    # the Socket.IO path is untouched
    assert requests.get(base + "/socket.io/?EIO=4&transport=polling", timeout=5).status_code == 200


def test_the_frontend_node_serves_metrics_and_health(config):
    from flask import Flask

    from siocluster import make_blueprint, make_frontend_server

    site = make_frontend_server(Flask("frontend"), config).test_client()
    assert site.get("/config.json").status_code == 200
    samples = {}
    for family in text_string_to_metric_families(site.get("/metrics").get_data(as_text=True)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert value(samples, "siocluster_io_node_lists_total", answer="listed") == 1
    assert value(samples, "siocluster_redis_up") == 1
    assert site.get("/healthz").get_json()["ok"] is True
    assert site.get("/readyz").get_json()["ready"] is True

    # Redis away: not ready, says why
    down = config.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    away = make_frontend_server(Flask("away"), down).test_client()
    answer = away.get("/readyz")
    assert answer.status_code == 503 and answer.get_json()["checks"]["redis"]["ok"] is False

    # a blueprint in someone's site adds no such paths unless asked
    plain = Flask("site")
    plain.register_blueprint(make_blueprint(config))
    assert plain.test_client().get("/metrics").status_code == 404
