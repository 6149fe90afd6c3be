"""What each kind of node counts, and how it reports it (`siocluster.observe` serves it).

`IoTelemetry` and `AppTelemetry` are parts of `IoNode` and `AppNode` (mixins): the node
bumps plain integers of its ``stats`` where things happen, and ``metrics()`` reads them,
with what is known only at scrape time (connections by transport, outbox and inbox depth),
when Prometheus asks. The handler-latency histogram has one series per event the app has a
handler for, and one for all others, so a client cannot grow it with event names of its own.
"""

import time
from collections import Counter
from typing import Dict

from . import observe
from .node import REDIS_DOWN

# what a refused event or connect is told, by its first words -> its metric label
REFUSALS = (("rate limit", "rate_limit"), ("message too large", "too_large"),
            ("server busy", "busy"), ("event name reserved", "reserved"),
            ("malformed", "malformed"), ("message refused", "not_text"),
            ("this io-node is shutting down", "closing"), ("no answer from the app", "timeout"))
OTHER_EVENT = "(other)"


def refusal_label(reason) -> str:
    text = str(reason or "")
    return next((label for prefix, label in REFUSALS if text.startswith(prefix)), "other")


class IoStats:
    """An io-node's counters since it started."""

    __slots__ = ("connects", "recovered", "disconnects", "parked", "events", "commands",
                 "refusals", "lag")

    def __init__(self):
        self.connects = self.recovered = self.disconnects = self.parked = 0
        self.events = self.commands = 0
        self.refusals: Counter = Counter()     # "event:<label>" / "connect:<label>"
        self.lag = 0.0                          # seconds, of the last stream entry applied


class IoTelemetry:
    """An io-node's metrics and readiness. `IoNode` provides ``sio``, ``clients``,
    ``outbox``, ``inbox``, ``config`` and ``_closing``, and bumps ``stats``."""

    def init_telemetry(self) -> None:
        self.stats = IoStats()

    def count_applied(self, commands: list, entry_id) -> None:
        """After a batch of commands was applied, up to entry ``entry_id`` of the stream
        every io-node reads (None: none of it was)."""
        self.stats.commands += len(commands)
        if entry_id is None:
            return
        try:
            self.stats.lag = max(0.0, time.time() - int(entry_id.partition("-")[0]) / 1000)
        except ValueError:
            pass

    def count_refusal(self, what: str, reason) -> None:
        self.stats.refusals[f"{what}:{refusal_label(reason)}"] += 1

    def metrics(self):
        yield from super().metrics()
        s = self.stats
        transports = {"websocket": 0, "polling": 0}
        for sock in list(self.sio.eio.sockets.values()):
            transports["websocket" if getattr(sock, "upgraded", False) else "polling"] += 1
        yield observe.gauges("siocluster_connections", "Engine.IO connections held, by "
                             "transport", "transport", transports)
        yield observe.gauge("siocluster_clients", "Socket.IO clients held", len(self.clients))
        yield observe.counter("siocluster_connects_total", "clients let in", s.connects)
        yield observe.counter("siocluster_recovered_total", "of those, clients that came back "
                              "as themselves (connection-state recovery)", s.recovered)
        yield observe.counters("siocluster_disconnects_total", "clients gone: left (the app "
                               "is told) or parked (they may come back)", "how",
                               {"left": s.disconnects, "parked": s.parked})
        yield observe.counter("siocluster_events_in_total", "client events taken", s.events)
        yield observe.counter("siocluster_commands_applied_total", "commands applied from the "
                              "streams", s.commands)
        refusals = observe.CounterMetricFamily("siocluster_refusals_total", "events and "
                                               "connects refused, by reason", labels=["what",
                                                                                      "reason"])
        for key, value in sorted(s.refusals.items()):
            refusals.add_metric(key.split(":", 1), value)
        yield refusals
        yield observe.counter("siocluster_slow_clients_cut_total", "clients disconnected for "
                              "reading too slowly (MAX_SEND_BACKLOG)",
                              getattr(self.sio.eio, "slow_clients_cut", 0))
        yield observe.gauge("siocluster_outbox_messages", "messages waiting for Redis",
                            len(self.outbox))
        yield observe.gauge("siocluster_outbox_bytes", "their bytes", self.outbox.bytes)
        yield observe.gauge("siocluster_command_stream_lag_seconds", "age of the last stream "
                            "entry when it was applied", s.lag)
        yield from inbox_depth(self)

    def readiness(self) -> dict:
        checks = super().readiness()
        if self._closing:
            checks["draining"] = (False, "stopping")
        full = len(self.outbox) >= self.config.outbox_size
        checks["outbox"] = (not full, f"{len(self.outbox)} of {self.config.outbox_size} "
                                      "messages waiting for Redis")
        return checks


class AppStats:
    """An app-node's counters since it started."""

    __slots__ = ("handled", "latency", "retries", "dead")

    def __init__(self):
        self.handled: Counter = Counter()               # by kind
        self.latency: Dict[str, observe.Histogram] = {}
        self.retries = self.dead = 0


class AppTelemetry:
    """An app-node's metrics and readiness. `AppNode` provides ``app``, ``inbox``,
    ``processing``, ``_busy``, and bumps ``stats``."""

    def init_telemetry(self) -> None:
        self.stats = AppStats()

    def count_handled(self, envelope, seconds: float) -> None:
        """A handler ran for ``seconds``."""
        kind = envelope.kind
        self.stats.handled[kind] += 1
        name = envelope.event if kind == "event" else kind
        if kind == "event" and not self.app.has_handler(name, envelope.namespace):
            name = OTHER_EVENT
        histogram = self.stats.latency.get(name)
        if histogram is None:
            histogram = self.stats.latency[name] = observe.Histogram()
        histogram.observe(seconds)

    def metrics(self):
        yield from super().metrics()
        s = self.stats
        yield observe.counters("siocluster_messages_handled_total", "client messages "
                               "handled, by kind", "kind", dict(s.handled))
        yield observe.histograms("siocluster_handler_seconds", "handler run time, by event "
                                 f"(events without a handler of their own: {OTHER_EVENT})",
                                 "event", s.latency)
        yield observe.counter("siocluster_retries_total", "messages tried again after their "
                              "handler raised", s.retries)
        yield observe.counter("siocluster_dead_letters_total", "messages this app-node moved "
                              "to the dead-letter list", s.dead)
        yield observe.gauge("siocluster_workers_busy", "workers running handlers", self._busy)
        yield from inbox_depth(self, app_node=self.id)

    def serve_http(self, address):
        """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``address`` (an app-node's
        ``HTTP_PORT``); returns the server, started."""
        from gevent.pywsgi import WSGIServer

        self._http = WSGIServer(address, self._http_app, log=None)
        self._http.start()
        return self._http

    def _http_app(self, environ, start_response):
        answer = self.observer.serve(environ, start_response)
        if answer is None:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"an app-node serves /metrics, /healthz and /readyz\n"]
        return answer

    def stop_http(self) -> None:
        server = getattr(self, "_http", None)
        if server is not None:
            server.stop(timeout=1)


def inbox_depth(node, app_node=None):
    """The cluster's inbox depth (and this app-node's clients in hand), read at scrape time;
    nothing when Redis does not answer (``siocluster_redis_up`` says so)."""
    try:
        messages, size = node.inbox.size()
        held = node.inbox.held(app_node) if app_node else None
    except REDIS_DOWN:
        return
    yield observe.gauge("siocluster_inbox_messages", "client messages in the inbox, "
                        "cluster-wide (waiting or being handled)", messages)
    yield observe.gauge("siocluster_inbox_bytes", "their bytes", size)
    if held is not None:
        yield observe.gauge("siocluster_messages_in_flight", "clients this app-node holds "
                            "(taken, their messages being handled)", held)
