"""What every node logs and how: ``LOG_LEVEL``, and ``LOG_FORMAT`` text or json.

The entry points call `setup` once the config is read, and `identify` once the node has its
id. In JSON each event is one line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``,
``node`` and ``kind`` (io-node, app-node, ...), ``msg``, and the client ids a log call
passes as ``extra`` (``sid``, ``namespace``, ``event``), plus ``exc`` for a traceback::

    logs.setup(config, "io-node")
    logs.identify(node.id)
    logger.warning("refused %r from %s", event, sid, extra={"sid": sid, "event": event})
"""

import json
import logging
import sys
import time

TEXT = "%(asctime)s %(name)s %(levelname)s %(message)s"
CLIENT_FIELDS = ("sid", "namespace", "event")


class NodeFields(logging.Filter):
    """Adds the node's id and kind to every record that does not carry them."""

    def __init__(self):
        super().__init__()
        self.node, self.kind = "", ""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "node"):
            record.node = self.node
        if not hasattr(record, "kind"):
            record.kind = self.kind
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per event, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = {"ts": f"{ts}.{int(record.msecs):03d}Z", "level": record.levelname,
                "logger": record.name, "node": getattr(record, "node", ""),
                "kind": getattr(record, "kind", ""), "msg": record.getMessage()}
        for key in CLIENT_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=repr)


_fields = NodeFields()


def setup(config, kind: str) -> None:
    """Log to stderr at ``config.log_level``, as text or JSON (``config.log_format``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_fields)
    handler.setFormatter(JsonFormatter() if config.log_format == "json"
                         else logging.Formatter(TEXT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level)
    _fields.kind = kind


def identify(node_id: str) -> None:
    """Name the node in every line from now on."""
    _fields.node = node_id
