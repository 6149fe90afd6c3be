"""`RecoveringClient`: python-socketio's client speaking socket.io's connection-state recovery.

The client side's one use of python-socketio's private methods (the server side's are all in
`siocluster.engine`, whose `TESTED_WITH` pins the versions both were written against).
"""

import time

import socketio
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
