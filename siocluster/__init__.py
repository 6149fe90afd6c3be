"""siocluster: run a Socket.IO application as a cluster of io-nodes and app-nodes over Redis.

The flat public API: the roles a user writes and runs. Importing the package imports
nothing heavy (gevent must be able to monkey-patch first in the entry points), so names
are loaded on first use.
"""

import importlib

__version__ = "0.1.0"

# the user-facing roles; the seed's names are in `siocluster.seed`, the wire format in
# `siocluster.envelope`, the Redis layout in `siocluster.state`
_EXPORTS = {
    "Config": "config",
    "ConfigError": "config",
    "IoServer": "config",
    "App": "app",
    "CallTimeout": "app",
    "current": "app",
    "AppNode": "appnode",
    "IoNode": "ionode",
    "Client": "ioclient",
    "IoSocketServer": "engine",
    "RecoveringClient": "recovering",
    "PolicyServer": "policy",
    "make_blueprint": "frontend",
    "make_frontend_server": "frontend",
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
