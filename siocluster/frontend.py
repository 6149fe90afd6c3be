"""The frontend-node: a Flask blueprint that tells browsers which io-nodes to connect to.

Register it on any Flask site (the seed's ``makeFrontendServer(server, config)``):

    app = Flask(__name__)
    app.register_blueprint(make_blueprint(config))     # or: make_frontend_server(app, config)

and a page loads the two scripts, then connects to one of the listed io-nodes:

    <script src="/socket.io.min.js"></script>
    <script src="/config.js"></script>
    <script>
      const servers = window.SIOCLUSTER.ioServers;
      const server = servers[Math.floor(Math.random() * servers.length)];
      const socket = io(server.url, {path: server.path});   // path: undefined is the default
    </script>

It serves, under the blueprint's ``url_prefix``:

- ``CLIENT_CONFIG_URL`` (``/config.js``): ``window.SIOCLUSTER = {"ioServers": [...]}``, each
  io-node as ``{"host", "port", "url"}`` with its external address only, and one that
  ``IO_SERVERS`` gives a public URL (io-nodes behind a reverse proxy, each on a path of one
  host name) also with ``"path"``: its ``url`` is then the origin, port included;
- the same data as JSON at the same path ending in ``.json`` (``/config.json``);
- ``/socket.io.min.js``: the Socket.IO browser client from the local copy that
  ``make client-js`` fetches, or a redirect to the same version on the public CDN;
- with ``health=True`` (`make_frontend_server`'s default, not the blueprint's, whose site
  may have its own): ``/metrics``, ``/healthz`` and ``/readyz`` (`siocluster.observe`).

The io-nodes listed are ``IO_SERVERS`` when the configuration has them (in their order),
otherwise the io-nodes alive right now in the Redis heartbeat registry (sorted by host and
port). Both answers are sent with ``Cache-Control: no-store``: the live list changes.
"""

import json
import logging
import os
from typing import List, Optional
from urllib.parse import urlsplit

from flask import Blueprint, Flask, Response, jsonify, redirect, request, send_from_directory
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.retry import Retry

from . import observe
from .config import Config, ConfigLike, IoServer, as_config
from .net import is_wildcard
from .state import ClusterState

# keep in step with scripts/fetch-socketio-client
CLIENT_VERSION = "4.8.1"
CLIENT_SCRIPT = "socket.io.min.js"
CLIENT_CDN_URL = f"https://cdn.socket.io/{CLIENT_VERSION}/{CLIENT_SCRIPT}"
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")

NO_STORE = {"Cache-Control": "no-store"}
UNAVAILABLE = ("the list of io-nodes is unavailable: this frontend-node cannot reach Redis. "
               "Try again shortly; operators: see the frontend-node's log, check "
               "SIOCLUSTER_REDIS_URL, or list the io-nodes in IO_SERVERS.")

# A page load waits on this answer, so fail fast instead of redis-py's retries with backoff;
# the client's own redis_options still win.
REDIS_OPTIONS = {"socket_connect_timeout": 2.0, "socket_timeout": 2.0,
                 "retry": Retry(NoBackoff(), 1)}

logger = logging.getLogger("siocluster.frontend")


class Frontend:
    """What one registration of the blueprint serves; `make_blueprint` builds it.

    :param config: the cluster's `Config`.
    :param static_dir: where the local ``socket.io.min.js`` is (default: the package's).
    """

    role = "frontend-node"

    def __init__(self, config: Config, static_dir: Optional[str] = None):
        self.config = config
        self.static_dir = static_dir or STATIC_DIR
        self.id = config.make_node_id(self.role)
        self.served = {"listed": 0, "unavailable": 0}     # io-node lists given, and refused
        self.listed = 0                                    # io-nodes in the last list
        self.observer = observe.Observer(self)
        self._state = None        # made at first use: a Redis Cluster client connects at once
        self._redis_down = False

    @property
    def state(self) -> Optional[ClusterState]:
        """The cluster state the live io-node list is read from (None with IO_SERVERS);
        raises `RedisError` while Redis (a whole Redis Cluster) cannot be reached."""
        if self._state is None and not self.config.io_servers:
            try:
                redis = self.config.redis_client(**{**REDIS_OPTIONS, **self.config.redis_options})
            except RuntimeError as exc:     # a Redis Cluster none of whose seeds answer
                raise RedisConnectionError(str(exc)) from None
            self._state = ClusterState(redis, self.config.keys())
        return self._state

    def io_servers(self, request_host: str, scheme: str = "http") -> List[dict]:
        """The io-nodes a browser may use; raises `RedisError` or `OSError` when Redis is down.

        An empty or wildcard external host (``0.0.0.0``, ``::``) becomes ``request_host``,
        the name the browser used to reach this frontend-node. An io-node that serves TLS
        itself is listed as ``https``; the others with the scheme of the browser's request
        (``https`` behind a proxy that ends TLS for them). An io-node configured with a
        public URL is listed as that URL says, with a ``path``.
        """
        if self.config.io_servers:
            servers = [s.public() for s in self.config.io_servers]
        else:
            live = self.state.nodes(role="io-node").values()
            # a node registers before it listens; until then it has no port to offer
            proxied = sorted({i["url"] for i in live if i.get("port") and i.get("url")})
            servers = sorted({(i.get("external") or "", i["port"], bool(i.get("tls")))
                              for i in live if i.get("port") and not i.get("url")})
            servers = [{"host": host, "port": port, "tls": tls} for host, port, tls in servers]
            # behind a proxy (PUBLIC_URL): as IO_SERVERS gives a URL, so does the live list
            servers += [IoServer.parse({"url": url}).public() for url in proxied]
        for server in servers:
            if "path" in server:        # a public URL (behind a proxy): given whole
                continue
            if is_wildcard(server["host"]):
                server["host"] = request_host
            host = f"[{server['host']}]" if ":" in server["host"] else server["host"]
            server["url"] = f"{'https' if server.pop('tls', False) else scheme}://{host}:" \
                            f"{server['port']}"
        return servers

    def client_config(self) -> Optional[dict]:
        """The data of ``/config.js`` for the current request, or None when Redis is down."""
        try:
            servers = self.io_servers(_request_hostname(), request.scheme)
        except (RedisError, OSError) as exc:
            # the browser gets no detail: Redis addresses are internal
            if not self._redis_down:
                logger.warning("frontend-node cannot list the io-nodes: Redis at %s: %s",
                               self.config.effective_redis_url.split("@")[-1], exc)
            self._redis_down = True
            self.served["unavailable"] += 1
            return None
        if self._redis_down:
            logger.warning("frontend-node: Redis is reachable again")
            self._redis_down = False
        self.served["listed"] += 1
        self.listed = len(servers)
        return {"ioServers": servers, "clientVersion": CLIENT_VERSION}

    # ---- what operators see ---------------------------------------------------------------

    def metrics(self):
        import siocluster

        yield observe.gauge("siocluster_node_info", "this node: version, kind, id", 1,
                            version=siocluster.__version__, kind=self.role, id=self.id)
        yield observe.gauge("siocluster_redis_up", "1 while this node reaches Redis",
                            0 if self._redis_down else 1)
        yield observe.counters("siocluster_io_node_lists_total", "io-node lists asked for: "
                               "given, or unavailable (Redis away)", "answer", self.served)
        yield observe.gauge("siocluster_io_nodes_listed", "io-nodes in the last list given",
                            self.listed)

    def readiness(self) -> dict:
        if self.config.io_servers:
            return {"redis": (True, "not needed: IO_SERVERS lists the io-nodes")}
        try:
            self.state.redis.ping()
            return {"redis": (True, "reachable")}
        except (RedisError, OSError) as exc:
            return {"redis": (False, f"unreachable: {exc.__class__.__name__}")}

    def observed(self):
        return Response.from_app(self.observer.serve, request.environ)

    # ---- views -----------------------------------------------------------------------------

    def config_js(self):
        data = self.client_config()
        if data is None:
            body = (f"// siocluster: {UNAVAILABLE}\n"
                    f"window.SIOCLUSTER = {json.dumps({'ioServers': [], 'error': UNAVAILABLE})};\n")
            status = 503
        else:
            body = ("// siocluster: the io-nodes this page may connect to (a live list)\n"
                    f"window.SIOCLUSTER = {json.dumps(data)};\n")
            status = 200
        return Response(body, status, mimetype="application/javascript", headers=NO_STORE)

    def config_json(self):
        data = self.client_config()
        if data is None:
            response = jsonify(ioServers=[], error=UNAVAILABLE)
            response.status_code = 503
        else:
            response = jsonify(data)
        response.headers.update(NO_STORE)
        return response

    def client_js(self):
        if os.path.isfile(os.path.join(self.static_dir, CLIENT_SCRIPT)):
            return send_from_directory(self.static_dir, CLIENT_SCRIPT)
        # no local copy (npm was missing at install): the same version from the public CDN
        return redirect(CLIENT_CDN_URL, 302)

    def add_routes(self, state, health: bool = False) -> None:
        """Add the views to a blueprint being registered (``state`` is Flask's setup state)."""
        js_url = self.config.client_config_url
        json_url = os.path.splitext(js_url)[0] + ".json"
        state.add_url_rule(js_url, "config_js", self.config_js)
        state.add_url_rule(json_url, "config_json", self.config_json)
        state.add_url_rule("/" + CLIENT_SCRIPT, "client_js", self.client_js)
        if health:
            for path in observe.PATHS:
                state.add_url_rule(path, path.strip("/"), self.observed)


def make_blueprint(config: ConfigLike = None, name: str = "siocluster",
                   url_prefix: Optional[str] = None, static_dir: Optional[str] = None,
                   health: bool = False) -> Blueprint:
    """A Flask blueprint serving ``/config.js``, ``/config.json`` and ``/socket.io.min.js``.

    :param config: a `Config` or a mapping of its keys (the seed's config dict); None reads
        the ``SIOCLUSTER_*`` keys of the Flask app's config when the blueprint is registered.
    :param name: the blueprint's name (endpoints are ``<name>.config_js``, ``.config_json``,
        ``.client_js``, for ``url_for``).
    :param url_prefix: where the blueprint's URLs live on the site.
    :param static_dir: the folder holding the local ``socket.io.min.js``.
    :param health: serve ``/metrics``, ``/healthz`` and ``/readyz`` too.
    """
    given = None if config is None else as_config(config)   # a bad config fails here, now
    blueprint = Blueprint(name, __name__, url_prefix=url_prefix)

    @blueprint.record
    def register(state):
        config = given if given is not None else Config.from_flask(state.app.config)
        Frontend(config, static_dir).add_routes(state, health)

    return blueprint


def make_frontend_server(flask_app: Flask, config: ConfigLike = None, **options) -> Flask:
    """Register the frontend-node on an existing Flask app and return the app (the seed's
    ``makeFrontendServer``); ``options`` go to `make_blueprint` (``health`` is on here)."""
    options.setdefault("health", True)
    flask_app.register_blueprint(make_blueprint(config, **options))
    return flask_app


def _request_hostname() -> str:
    """The host the browser asked for, without its port (and without IPv6 brackets)."""
    try:
        return urlsplit("//" + request.host).hostname or request.host
    except ValueError:      # a malformed Host header: it only ever goes back to its sender
        return request.host
