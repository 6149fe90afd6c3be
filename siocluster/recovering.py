"""python-socketio's classes for socket.io's connection-state recovery: `RecoveringClient`,
its client speaking it, and `IoManager`, the io-node's client manager that gives a client
coming back its old sid.

The client side's one use of python-socketio's private methods (the server side's are all in
`siocluster.engine`, whose `TESTED_WITH` pins the versions both were written against).
"""

import time

import socketio
from bidict import ValueDuplicationError
from socketio import packet as sio_packet


class RecoveringClient(socketio.Client):
    """python-socketio's client, speaking connection-state recovery as socket.io's own
    client (4.6+) does: it keeps the private id the server gives each namespace and the
    offset that ends each event (taken off before handlers see it), and presents both when
    it reconnects, so it comes back as itself. ``recovered[namespace]`` tells whether the
    last connect did. Also ``siocluster.RecoveringClient``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pids, self.offsets, self.recovered = {}, {}, {}

    def _handle_connect(self, namespace, data):
        namespace = namespace or "/"
        pid = data.get("pid") if isinstance(data, dict) else None
        self.recovered[namespace] = bool(pid) and self.pids.get(namespace) == pid
        if pid:
            self.pids[namespace] = pid
        super()._handle_connect(namespace, data)

    def _handle_event(self, namespace, id, data):
        namespace = namespace or "/"
        if id is None and namespace in self.pids and len(data) > 1 \
                and isinstance(data[-1], str):
            self.offsets[namespace] = data[-1]
            data = data[:-1]
        super()._handle_event(namespace, id, data)

    def _send_packet(self, pkt):
        namespace = pkt.namespace or "/"
        if pkt.packet_type == sio_packet.CONNECT and namespace in self.pids:
            fields = {"pid": self.pids[namespace]}
            if namespace in self.offsets:
                fields["offset"] = self.offsets[namespace]
            pkt.data = {**fields, **(pkt.data if isinstance(pkt.data, dict) else {})}
        super()._send_packet(pkt)

    def disconnect(self):
        # python-socketio's client closes its websocket at once, often before the
        # DISCONNECT packets are out; the server would then take a mere transport close,
        # and keep the client's state for it to come back: the packets go out first
        for namespace in self.namespaces:
            self._send_packet(self.packet_class(sio_packet.DISCONNECT, namespace=namespace))
        deadline = time.monotonic() + 1.0
        while getattr(self.eio.queue, "unfinished_tasks", 0) and time.monotonic() < deadline:
            time.sleep(0.005)
        self.eio.disconnect()


class IoManager(socketio.Manager):
    """python-socketio's client manager, but a client that comes back as itself
    (connection-state recovery) is given its old sid rather than a new one."""

    def pre_connect(self, eio_sid, namespace):
        sid = self.server.returning_sids.get((eio_sid, namespace))
        if sid is None:
            return super().pre_connect(eio_sid, namespace)
        # python-socketio's pre_connect, with that sid
        try:
            self.basic_enter_room(sid, namespace, None, eio_sid=eio_sid)
        except ValueDuplicationError:
            return None
        self.basic_enter_room(sid, namespace, sid, eio_sid=eio_sid)
        self.pending_connect.setdefault(namespace, []).append(sid)
        return sid
