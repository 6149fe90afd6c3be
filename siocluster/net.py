"""Hosts and ports: reading port numbers and lists of them, telling an every-interface address
from a real one, and asking this machine what it can listen on or reach right now.

The cluster runner, the frontend-node, the policy server and the configuration share these,
so the module needs nothing of siocluster's but `ConfigError`.
"""

import argparse
import ipaddress
import socket
from typing import Any, List, Optional

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


def parse_ports(text: str) -> List[int]:
    """Ports separated by spaces and/or commas, for an argparse ``type=``."""
    try:
        ports = [int(p) for p in text.replace(",", " ").split()]
    except ValueError:
        ports = []
    if not ports or not all(0 < p < 65536 for p in ports):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of ports such as "
                                         "\"8081 8082\" or 8081,8082")
    return ports


def is_wildcard(host: str) -> bool:
    """True for a host meaning every interface: empty, ``0.0.0.0``, ``::`` or ``[::]``."""
    if not host:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def primary_address() -> List[str]:
    """This machine's address on its default route, if it has one (nothing is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))      # TEST-NET-1: only picks the outgoing interface
            return [s.getsockname()[0]]
        except OSError:
            return []


def browser_host(host: str) -> str:
    """The host a browser on this machine uses to reach a server listening on ``host``."""
    return "localhost" if is_wildcard(host) else host


def bind_error(host: str, port: int) -> Optional[int]:
    """None when a server could listen on ``host:port`` now, else the errno saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        # as the servers do: a port with only closed connections in TIME_WAIT is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.errno
    return None


def accepts(host: str, port: int) -> bool:
    """True when a server listening on ``host:port`` accepts a connection from here now."""
    target = "127.0.0.1" if is_wildcard(host) else host
    try:
        with socket.create_connection((target, port), timeout=0.5):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing uses right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
