"""The official Socket.IO client in headless Chromium, over wss:// and https:// to an io-node
that serves TLS itself (CERTFILE, KEYFILE), on a self-signed certificate.

Needs what tests/test_browser.py needs (``make browser-deps``).
"""

import shutil
import tempfile
from pathlib import Path

import pytest
from gevent import pywsgi

from siocluster.frontend import STATIC_DIR
from tests import test_browser
from tests.test_tls import certificate, chat_app  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PAGE = """<!doctype html><meta charset="utf-8"><title>tls</title>
<script src="/socket.io.min.js"></script>
<script>
  window.results = {};
  const sockets = {};
  // both say something once both are connected: a broadcast reaches connected clients only
  const sayAll = () => {
    if (Object.values(sockets).filter((socket) => socket.connected).length < 2) return;
    for (const [transport, socket] of Object.entries(sockets)) {
      socket.emit("say", "from " + transport,
                  (answer) => { window.results[transport].ack = answer; });
    }
  };
  for (const transport of ["websocket", "polling"]) {
    const result = window.results[transport] = {said: []};
    const socket = sockets[transport] = io("https://127.0.0.1:%(port)d",
                                           {transports: [transport], reconnection: false});
    socket.on("connect_error", (error) => { result.error = String(error); });
    socket.on("said", (data) => { result.said.push(data.text); });
    socket.on("connect", () => {
      result.transport = socket.io.engine.transport.name;
      sayAll();
    });
  }
</script>
"""


def page_server(io_port):
    """A plain http server for the page and the official client, on another port."""
    client_js = (Path(STATIC_DIR) / "socket.io.min.js").read_bytes()

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/socket.io.min.js":
            start_response("200 OK", [("Content-Type", "application/javascript")])
            return [client_js]
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
        return [(PAGE % {"port": io_port}).encode()]

    server = pywsgi.WSGIServer(("127.0.0.1", 0), app, log=None)
    server.start()
    return server


@pytest.fixture
def chromium(monkeypatch):
    """A headless Chromium that accepts the test's self-signed certificate."""
    monkeypatch.setattr(test_browser, "CHROMIUM_FLAGS",
                        test_browser.CHROMIUM_FLAGS + ["--ignore-certificate-errors"])
    profile = tempfile.mkdtemp(prefix="siocluster-chromium-")
    driver = test_browser.start_chromium(profile)
    driver.set_page_load_timeout(test_browser.WAIT)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_the_official_client_over_wss_and_https(cluster, certificate, chromium):  # noqa: F811
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    certfile, keyfile = certificate
    io = cluster.io_node(certfile=certfile, keyfile=keyfile)
    cluster.app_node(chat_app())
    server = page_server(io.address[1])
    expected = {transport: {"said": ["from polling", "from websocket"], "transport": transport,
                            "ack": {"ok": True, "text": f"from {transport}"}}
                for transport in ("websocket", "polling")}

    def results(_=None):
        found = chromium.execute_script("return window.results") or {}
        for result in found.values():
            result["said"] = sorted(result.get("said", []))
        return found

    try:
        chromium.get(f"http://127.0.0.1:{server.address[1]}/")
        try:
            WebDriverWait(chromium, test_browser.WAIT, poll_frequency=0.05).until(
                lambda _: results() == expected)
        except TimeoutException:
            raise AssertionError(f"the page shows {results()}, not {expected}; console: "
                                 f"{chromium.get_log('browser')}") from None
    finally:
        server.stop(timeout=1)
