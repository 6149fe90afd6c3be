"""Hosts and ports: reading port numbers.

The configuration and the connection to Redis share this, so the module needs nothing of
siocluster's but `ConfigError`.
"""

from typing import Any

from .errors import ConfigError


def port_number(value: Any, key: str) -> int:
    """``value`` as a port number (0-65535), or a `ConfigError` naming ``key``."""
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {value!r} is not a port number")
    if not 0 <= port <= 65535:
        raise ConfigError(f"{key}: {port} is not a port number (0-65535)")
    return port
