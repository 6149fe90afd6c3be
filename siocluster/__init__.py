"""siocluster: run a Socket.IO application as a cluster of io-nodes and app-nodes over Redis.

The flat public API. Importing the package imports nothing heavy (gevent must be able to
monkey-patch first in the entry points), so names are loaded on first use.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "config",
    "ConfigError": "config",
    "IoServer": "config",
    "Envelope": "envelope",
    "MessageError": "envelope",
    "ClusterState": "state",
    "Keys": "state",
    "IoNode": "ionode",
    "IoSocketServer": "engine",
    "Client": "ionode",
    "App": "appnode",
    "AppNode": "appnode",
    "CallTimeout": "appnode",
    "PolicyServer": "policy",
    "make_blueprint": "frontend",
    "make_frontend_server": "frontend",
    "make_io_listener": "seed",
    "make_io_server": "seed",
    "make_listener": "seed",
    "make_app_server": "seed",
    "IoListener": "seed",
    "IoMessage": "seed",
    "Listener": "seed",
    "AppMessage": "seed",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'siocluster' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
