"""The Socket.IO Admin UI, cluster-wide: ``app.instrument(auth=...)`` as in python-socketio.

The Admin UI (the hosted https://admin.socket.io page, or a self-hosted
``@socket.io/admin-ui`` build) connects to the ``/admin`` namespace of any io-node. Its
connect and its commands go to the app tier like any client's, so an admin sees and acts on
the whole cluster: `AdminUI` answers the connect with the socket list of every io-node (from
the cluster state in Redis), runs ``join``, ``leave``, ``_disconnect`` and ``emit`` on every
matching client wherever it is, tells admins of each client's connect, disconnect, events
and rooms as app-nodes handle them (``mode="development"``), and one app-node at a time
sends each io-node's ``server_stats`` every ``server_stats_interval`` seconds::

    app.instrument(auth={"username": "admin", "password": os.environ["ADMIN_PASSWORD"]})
    app.instrument(auth=False, read_only=True)      # no login: say so explicitly

``auth`` is a dict the client's auth must equal, a list of such dicts, or a function of
the client's auth returning True to let it in; None refuses to start, as python-socketio
does, and False turns authentication off. ``read_only`` leaves out join, leave, disconnect
and emit; ``mode="production"`` leaves out the per-client events (and their cost: one emit
to admins per client message). Not reported: ``event_sent`` (one per recipient of every
emit) and packet and byte counts (they are in each node's ``/metrics``).
"""

import socket as stdlib_socket
import time
from datetime import datetime, timezone
from typing import Any, List, Optional

ADMINS = "siocluster:admins"      # the room of connected admins, in the admin namespace
HOSTNAME = stdlib_socket.gethostname()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat() if ts else ""


class AdminUI:
    """Serves the Admin UI's protocol through ``app``'s handlers (see the module)."""

    def __init__(self, app, auth, mode: str = "development", read_only: bool = False,
                 server_id: Optional[str] = None, namespace: str = "/admin",
                 server_stats_interval: float = 2):
        if auth is None:
            raise ValueError("instrument() needs auth: a dict of credentials, a list of them, "
                             "or a function; auth=False turns authentication off explicitly")
        if mode not in ("development", "production"):
            raise ValueError(f"mode must be 'development' or 'production', not {mode!r}")
        self.app, self.auth, self.mode, self.read_only = app, auth, mode, read_only
        self.namespace, self.interval = namespace, server_stats_interval
        self.server_id = server_id
        app.on("connect", self._connect, namespace=namespace)
        if not read_only:
            app.on("emit", self._emit, namespace=namespace)
            app.on("join", self._join, namespace=namespace)
            app.on("leave", self._leave, namespace=namespace)
            app.on("_disconnect", self._disconnect, namespace=namespace)

    # ---- the admin namespace ----------------------------------------------------------------

    def _allowed(self, client_auth) -> bool:
        if self.auth is False:
            return True
        if isinstance(self.auth, dict):
            return client_auth == self.auth
        if isinstance(self.auth, list):
            return client_auth in self.auth
        return bool(self.auth(client_auth))

    def _connect(self, sid, environ, client_auth=None):
        if not self._allowed(client_auth):
            return False
        features = ["AGGREGATED_EVENTS"]
        if not self.read_only:
            features += ["EMIT", "JOIN", "LEAVE", "DISCONNECT", "MJOIN", "MLEAVE", "MDISCONNECT"]
        if self.mode == "development":
            features.append("ALL_EVENTS")
        self.app.enter_room(sid, ADMINS, namespace=self.namespace)
        self.app.emit("config", {"supportedFeatures": features}, to=sid,
                      namespace=self.namespace)
        if self.mode == "development":
            self.app.emit("all_sockets", self.all_sockets(), to=sid, namespace=self.namespace)
        return True

    def _targets(self, namespace: str, room_filter) -> List[str]:
        app = self.app
        if room_filter is None:
            return [record["sid"] for record in app.clients(namespace)]
        rooms = room_filter if isinstance(room_filter, list) else [room_filter]
        sids = set()
        for room in rooms:
            if app.client(room) is not None:
                sids.add(room)                  # a sid: its own room
            sids.update(app.room_members(room, namespace))
        return sorted(sids)

    def _emit(self, sid, namespace, room_filter, event, *data):
        self.app.emit(event, tuple(data) if len(data) != 1 else data[0],
                      to=room_filter, namespace=namespace)

    def _join(self, sid, namespace, room, room_filter=None):
        for target in self._targets(namespace, room_filter):
            self.app.enter_room(target, room, namespace=namespace)

    def _leave(self, sid, namespace, room, room_filter=None):
        for target in self._targets(namespace, room_filter):
            self.app.leave_room(target, room, namespace=namespace)

    def _disconnect(self, sid, namespace, close=False, room_filter=None):
        for target in self._targets(namespace, room_filter):
            self.app.disconnect(target, namespace=namespace)

    # ---- what admins are told ---------------------------------------------------------------

    def serialize(self, record: dict) -> dict:
        """A client as the Admin UI shows a socket, from its record in the cluster state."""
        sid, info = record["sid"], record.get("info") or {}
        connected = float(record.get("connected_at") or 0)
        headers = {key: info[field] for key, field in (("user-agent", "user_agent"),
                                                       ("origin", "origin"))
                   if info.get(field)}
        return {"id": sid, "clientId": record.get("conn") or sid,
                "transport": record.get("transport") or "websocket",
                "nsp": record.get("namespace") or "/", "data": {},
                "handshake": {"address": info.get("remote_addr") or "", "headers": headers,
                              "query": {}, "secure": False, "url": "/socket.io/",
                              "issued": connected * 1000, "time": _iso(connected)},
                "rooms": self.app.rooms(sid),
                "serverId": record.get("node")}

    def all_sockets(self) -> List[dict]:
        return [self.serialize(record) for record in self.app.clients()
                if record.get("namespace") != self.namespace]

    def saw(self, envelope) -> None:
        """An app-node handled ``envelope``: tell the admins (development mode)."""
        if self.mode != "development" or envelope.namespace == self.namespace:
            return
        now = _iso(time.time())
        if envelope.kind == "connect":
            record = self.app.client(envelope.sid)
            if record is not None:
                self._tell("socket_connected", (self.serialize(record), now))
        elif envelope.kind == "disconnect":
            self._tell("socket_disconnected", (envelope.namespace, envelope.sid,
                                               envelope.reason or "", now))
        else:
            self._tell("event_received", (envelope.namespace, envelope.sid,
                                          [envelope.event, *envelope.args], now))

    def room_changed(self, what: str, namespace: str, room: str, sid: str) -> None:
        if self.mode == "development" and namespace != self.namespace:
            self._tell(what, (namespace, room, sid, _iso(time.time())))

    def _tell(self, event: str, data: Any) -> None:
        self.app.emit(event, data, to=ADMINS, namespace=self.namespace)

    def server_stats(self, node) -> int:
        """Send each live io-node's ``server_stats`` to the admins, if any are connected
        and no other app-node did this interval; returns how many were sent."""
        state, keys = node.state, node.keys
        if not state.room_members(self.namespace, ADMINS):
            return 0
        lock = keys.app("admin-stats")
        if not node.redis.set(lock, node.id, nx=True, px=max(100, int(self.interval * 900))):
            return 0
        namespaces = sorted({ns for ns in self.app.handlers if ns not in ("*", self.namespace)}
                            | {"/"})
        sockets = [{"name": ns, "socketsCount": state.count(ns)} for ns in namespaces]
        sent = 0
        for io_id, info in sorted(state.nodes(role="io-node").items()):
            self.app.emit("server_stats", {
                "serverId": self.server_id or io_id, "hostname": info.get("host") or HOSTNAME,
                "pid": info.get("pid") or 0,
                "uptime": max(0.0, time.time() - float(info.get("started_at") or time.time())),
                "clientsCount": int(info.get("clients") or 0),
                "pollingClientsCount": int(info.get("polling_clients") or 0),
                "aggregatedEvents": [], "namespaces": sockets,
            }, to=ADMINS, namespace=self.namespace)
            sent += 1
        return sent
