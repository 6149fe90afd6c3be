"""``IO_SERVERS``: the io-nodes a frontend-node lists to browsers, and what browsers see of each.

Each io-node is given in one of three spellings, all in one list:

- ``{"internal": "10.0.0.5", "external": "io1.example.com", "port": 8081}`` (the seed's), or
  ``"internal|external:port"`` / ``"host:port"`` in an environment variable or a flag;
- ``{"internal": "10.0.0.5:8081", "url": "wss://chat.example.com/io/1/socket.io/"}``, or
  ``"internal|url"`` / ``"url"``: a full public URL, path included, for io-nodes behind a
  reverse proxy that gives each one a path of one host name (and one certificate).

``internal`` is for the operators (what the proxy or the cluster reaches) and is never shown
to a browser; browsers get the public host and port, and for a URL its origin and path, the
two things the Socket.IO client needs: ``io(url, {path})``.
"""

import dataclasses
import json
import re
from typing import Any, List, Mapping, Optional
from urllib.parse import urlsplit

from .errors import ConfigError
from .net import is_wildcard, port_number

SCHEMES = {"http": "http", "ws": "http", "https": "https", "wss": "https"}
DEFAULT_PATH = "/socket.io/"
_PATH = re.compile(r"/[\w\-.~!$&'()*+,;=:@%/]*", re.ASCII)      # RFC 3986 path characters
_HOST = re.compile(r"[a-z0-9\-._:]+", re.ASCII)


@dataclasses.dataclass(frozen=True)
class IoServer:
    """One io-node as ``IO_SERVERS`` lists it.

    ``internal`` is the address the cluster uses; browsers are shown ``external`` and
    ``port`` only, or, when the io-node has a public ``url``, that URL's parts.
    """

    internal: str
    external: str
    port: int
    url: Optional[str] = None      # https://host:port/path/ (ws:// and wss:// become http(s))

    @classmethod
    def parse(cls, value: Any, key: str = "IO_SERVERS") -> "IoServer":
        if isinstance(value, IoServer):
            return value
        if isinstance(value, str) and "://" in value:
            # "url" or "internal|url" (a URL has no "|"): environment variables and flags
            internal, _, url = value.rpartition("|")
            value = {"internal": internal, "url": url}
        elif isinstance(value, str):
            # "host:port" or "internal|external:port" for environment variables and flags
            host, sep, port = value.rpartition(":")
            if not sep:
                raise ConfigError(f"{key}: {value!r} is neither host:port nor a URL such as "
                                  "wss://chat.example.com/io/1/socket.io/")
            internal, _, external = host.partition("|")
            value = {"internal": internal, "external": external or internal, "port": port}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: each io-node must be an object with internal and url, "
                              f"or with internal, external and port, not {value!r}")
        unknown = set(value) - {"internal", "external", "port", "url"}
        if unknown:
            raise ConfigError(f"{key}: unknown field {sorted(unknown)[0]!r} in {dict(value)!r}")
        if "url" in value:
            url, host, port = public_url(value["url"], f"{key}: url")
            if "external" in value or "port" in value:
                raise ConfigError(f"{key}: an io-node has a url, or an external host and a "
                                  f"port, not both (the url says both): {dict(value)!r}")
            return cls(internal=str(value.get("internal") or host), external=host, port=port,
                       url=url)
        internal = str(value.get("internal") or "")
        external = str(value.get("external") or internal or "")
        port = port_number(value.get("port"), f"{key}.port")
        return cls(internal=internal or external, external=external, port=port)

    def public(self) -> dict:
        """What a browser may see: the external address, or the public URL's parts. Then
        ``url`` is the URL's origin, port included, and ``path`` the Socket.IO client's
        ``path`` option: ``io(url, {path})`` (the path in ``io()``'s URL is a namespace)."""
        if not self.url:
            return {"host": self.external, "port": self.port}
        parts = urlsplit(self.url)
        return {"host": self.external, "port": self.port,
                "url": f"{parts.scheme}://{parts.netloc}", "path": parts.path}


def public_url(value: Any, key: str = "IO_SERVERS: url"):
    """An io-node's public URL, checked and made whole: ``(url, host, port)``.

    The URL comes back with an ``http``/``https`` scheme (``ws``/``wss`` are spellings of
    them), its port written out (a page on another port would otherwise lend the client its
    own) and a path ending in ``/`` (``/socket.io/``, the io-node's own, when it has none).
    A URL browsers could not use, or that holds what they must not see, is a `ConfigError`.
    """
    if not isinstance(value, str):
        raise ConfigError(f"{key}: {value!r} is not a URL such as "
                          "wss://chat.example.com/io/1/socket.io/")
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{key}: {value!r} is not a URL ({exc})")
    scheme = SCHEMES.get(parts.scheme.lower())
    host = parts.hostname or ""
    path = parts.path.rstrip("/") + "/" if parts.path.strip("/") else DEFAULT_PATH
    for wrong, why in (
            (scheme is None, "must start with https://, wss://, http:// or ws://"),
            (not _HOST.fullmatch(host), "has no host name or address"),
            (is_wildcard(host), "has an every-interface address, which no browser can reach"),
            (parts.username is not None, "holds a user or password, which browsers would see"),
            ("?" in value or "#" in value, "has a query or fragment: give the path alone"),
            (not _PATH.fullmatch(path), "has characters that a URL path cannot have"),
            (port == 0, "has port 0")):
        if wrong:
            # a password is not repeated in the message (nor so in the log)
            said = value.replace(parts.netloc, "***@" + parts.netloc.rpartition("@")[2]) \
                if parts.username is not None else value
            raise ConfigError(f"{key}: {said!r} {why}")
    port = port or (443 if scheme == "https" else 80)
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}{path}", host, port


def parse_io_servers(value: Any, key: str = "IO_SERVERS") -> List[IoServer]:
    """A list of io-nodes from a list, JSON text, or comma-separated text (flags and
    environment variables)."""
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ConfigError(f"{key}: not valid JSON ({exc})")
        else:
            value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: must be a list of io-nodes, not {value!r}")
    return [IoServer.parse(v, key) for v in value]
