"""The one configuration object every node is built from.

Configuration enters at the edges (keyword arguments, a mapping such as a Flask config,
``SIOCLUSTER_*`` environment variables, command-line flags), becomes one `Config`, and is
passed down; nothing deeper in siocluster reads the environment.

    config = Config.load(argv=sys.argv[1:], environ=os.environ)
    config = Config.from_mapping({"REDIS_HOST": "db", "IO_SERVERS": [...]})

The seed's keys (``REDIS_HOST``, ``REDIS_PORT``, ``REDIS_PASSWORD``, ``REDIS_DATABASE``,
``HTTP_HOST``, ``HTTP_PORT``, ``CLIENT_CONFIG_URL``, ``IO_SERVERS``) are accepted as they
are. Anything wrong fails at start with a `ConfigError` that names the key. The Redis URL
is checked, and the client built from it, by `siocluster.connection`.
"""

import argparse
import dataclasses
import difflib
import json
import os
import socket
import uuid
from typing import Any, List, Mapping, Optional, Union
from urllib.parse import quote

from . import defaults
from .connection import make_redis, parse_redis_url
from .errors import ConfigError
from .ioservers import IoServer, parse_io_servers, public_url
from .net import port_number

ENV_PREFIX = "SIOCLUSTER_"

# What each kind of node reads besides Redis, the prefix, its id, logs, heartbeats and where
# it listens: a node's `--help` lists its own settings. The others are still accepted (one
# environment or command line may serve several kinds of node), only not listed.
COMMON_SETTINGS = {"redis_url", "redis_host", "redis_port", "redis_password", "redis_username",
                   "redis_database", "prefix", "http_host", "http_port", "node_id", "log_level",
                   "log_format", "heartbeat_interval", "node_ttl", "shards"}
ROLE_SETTINGS = {
    "app-node": {"workers", "pop_timeout", "max_attempts", "call_timeout", "dead_maxlen",
                 "dead_record_size", "stream_maxlen", "recovery_window"},
    "io-node": {"public_host", "public_url", "pop_timeout", "connect_timeout",
                "connect_timeout_accept", "ack_timeout", "outbox_size", "outbox_max_bytes",
                "max_message_size", "rate_limit", "rate_burst", "max_send_backlog",
                "max_attachments", "max_connections", "max_connections_per_address",
                "handshake_timeout", "certfile", "keyfile", "cors_allowed_origins",
                "inbox_maxlen", "inbox_max_bytes", "client_queue_maxlen", "stream_maxlen",
                "recovery_window", "recovery_max_packets", "recovery_max_bytes"},
    "frontend-node": {"client_config_url", "io_servers"},
    "policy server": {"policy_max_connections", "io_servers"},
}


def _field(default, help, *, seed=None, flag=True):
    return dataclasses.field(default=default, metadata={"help": help, "seed": seed, "flag": flag})


@dataclasses.dataclass
class Config:
    """Settings of one siocluster node. Unknown keys are refused.

    :param redis_url: ``redis://``, ``rediss://`` (TLS), ``unix://``,
        ``redis+sentinel://[user:pass@]host:port[,host:port]/service[/db]`` or
        ``redis+cluster://[user:pass@]host:port[,host:port]`` (``rediss+cluster://``). When empty it
        is built from the seed's ``REDIS_HOST``/``REDIS_PORT``/... keys, or defaults to
        ``redis://localhost:6379/0``.
    :param prefix: prefix of every Redis key, so several clusters can share one Redis.
    :param io_servers: the io-nodes browsers may use (``IO_SERVERS``); when empty the
        frontend-node lists the io-nodes alive right now.
    """

    redis_url: Optional[str] = _field(None, "Redis URL (redis://, rediss://, "
                                    "redis+sentinel://, redis+cluster://)")
    redis_host: Optional[str] = _field(None, "Redis host (seed key)", seed="REDIS_HOST")
    redis_port: Optional[int] = _field(None, "Redis port (seed key)", seed="REDIS_PORT")
    redis_password: Optional[str] = _field(None, "Redis password (seed key)",
                                           seed="REDIS_PASSWORD")
    redis_username: Optional[str] = _field(None, "Redis ACL user")
    redis_database: Optional[int] = _field(None, "Redis database number (seed key)",
                                           seed="REDIS_DATABASE")
    redis_options: dict = _field(None, "extra redis-py client options",
                                 flag=False)
    prefix: str = _field(defaults.PREFIX, "prefix of every Redis key of this cluster")
    shards: int = _field(0, "shards of the inbox and command streams, the same on every "
                            f"node (0: 1 on one Redis, {defaults.CLUSTER_SHARDS} on a Redis "
                            "Cluster)")

    http_host: str = _field(defaults.HTTP_HOST, "address to listen on", seed="HTTP_HOST")
    http_port: int = _field(defaults.HTTP_PORT, "port to listen on", seed="HTTP_PORT")
    client_config_url: str = _field(defaults.CLIENT_CONFIG_URL,
                                    "URL of the io-node list for browsers",
                                    seed="CLIENT_CONFIG_URL")
    io_servers: List[IoServer] = _field(None,
                                        "io-nodes browsers may use: host:port, "
                                        "internal|external:port, or a public URL per "
                                        "io-node (behind a proxy), comma-separated",
                                        seed="IO_SERVERS")
    public_host: Optional[str] = _field(None, "host browsers use to reach this io-node "
                                              "(default: its listening host)")
    public_url: Optional[str] = _field(None, "io-node: the URL browsers reach it by through "
                                             "a proxy (wss://host/io/1/socket.io/), which "
                                             "the frontend's live list gives them")
    node_id: Optional[str] = _field(None, "this node's id (default: host-pid-random)")
    log_level: str = _field(defaults.LOG_LEVEL, "log level: DEBUG, INFO, WARNING, ERROR")
    log_format: str = _field(defaults.LOG_FORMAT, "log lines: text, or json (one event a "
                             "line, with node, kind and client ids)")

    workers: int = _field(defaults.WORKERS, "app-node: greenlets popping the inbox")
    pop_timeout: float = _field(defaults.POP_TIMEOUT, "app-node: seconds one blocking pop waits")
    max_attempts: int = _field(defaults.MAX_ATTEMPTS,
                               "deliveries of one message before it is dead-lettered")
    call_timeout: float = _field(defaults.CALL_TIMEOUT, "app.call(): seconds to wait")

    connect_timeout: float = _field(defaults.CONNECT_TIMEOUT,
                                    "io-node: seconds to wait for the connect verdict")
    connect_timeout_accept: bool = _field(defaults.CONNECT_TIMEOUT_ACCEPT,
                                          "io-node: accept a connection when no verdict came")
    ack_timeout: float = _field(defaults.ACK_TIMEOUT, "io-node: seconds a client's ack may wait")
    outbox_size: int = _field(defaults.OUTBOX_SIZE,
                              "io-node: client messages buffered while Redis is away")
    max_message_size: int = _field(defaults.MAX_MESSAGE_SIZE, "bytes of one client message")
    rate_limit: float = _field(defaults.RATE_LIMIT,
                               "events per second per connection (0: unlimited)")
    rate_burst: int = _field(defaults.RATE_BURST, "events a connection may send at once")
    max_send_backlog: int = _field(defaults.MAX_SEND_BACKLOG,
                                   "io-node: bytes waiting for one slow client (websocket "
                                   "or polling) before it is disconnected")
    outbox_max_bytes: int = _field(defaults.OUTBOX_MAX_BYTES,
                                   "io-node: bytes of client messages buffered while Redis "
                                   "is away")
    max_attachments: int = _field(defaults.MAX_ATTACHMENTS,
                                  "binary attachments of one client message")
    max_connections: int = _field(defaults.MAX_CONNECTIONS,
                                  "io-node: connections held at once")
    max_connections_per_address: int = _field(defaults.MAX_CONNECTIONS_PER_ADDRESS,
                                              "io-node: connections from one client address")
    handshake_timeout: float = _field(defaults.HANDSHAKE_TIMEOUT,
                                      "io-node: seconds to send a request or finish an upgrade")
    certfile: Optional[str] = _field(None, "io-node: TLS certificate (PEM): serve https/wss")
    keyfile: Optional[str] = _field(None, "io-node: TLS private key (PEM) of CERTFILE")
    policy_max_connections: int = _field(defaults.POLICY_MAX_CONNECTIONS,
                                         "policy server: requests answered at once")
    cors_allowed_origins: Optional[List[str]] = _field(
        None, "origins allowed to open Socket.IO connections "
              "(default: pages on the io-node's own host name)")

    inbox_maxlen: int = _field(defaults.INBOX_MAXLEN,
                               "client messages waiting in Redis before new ones are refused")
    inbox_max_bytes: int = _field(defaults.INBOX_MAX_BYTES,
                                  "bytes of them before new ones are refused")
    client_queue_maxlen: int = _field(defaults.CLIENT_QUEUE_MAXLEN,
                                      "messages of one client waiting before its new ones "
                                      "are refused")
    dead_maxlen: int = _field(defaults.DEAD_MAXLEN,
                              "records kept in the dead-letter list (the oldest dropped)")
    dead_record_size: int = _field(defaults.DEAD_RECORD_SIZE,
                                   "bytes of one dead-letter record (a larger message is cut)")
    stream_maxlen: int = _field(defaults.STREAM_MAXLEN, "commands kept for reconnecting io-nodes")
    recovery_window: float = _field(defaults.RECOVERY_WINDOW,
                                    "seconds a client that lost its connection may come back "
                                    "as itself (its sid, rooms, session, missed packets); 0: off")
    recovery_max_packets: int = _field(defaults.RECOVERY_MAX_PACKETS,
                                       "packets a returning client may have missed; past "
                                       "that it comes back as a new client")
    recovery_max_bytes: int = _field(defaults.RECOVERY_MAX_BYTES,
                                     "bytes of them; past that it comes back as a new client")
    heartbeat_interval: float = _field(defaults.HEARTBEAT_INTERVAL, "seconds between heartbeats")
    node_ttl: float = _field(defaults.NODE_TTL, "seconds without heartbeat before a node is dead")

    def __post_init__(self):
        if self.redis_options is None:
            self.redis_options = {}
        if self.io_servers is None:
            self.io_servers = []
        self.validate()

    # ---- building ----------------------------------------------------------------------

    @classmethod
    def setting_names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], *, strict: bool = True,
                     base: Optional["Config"] = None) -> "Config":
        """Build from a mapping of seed keys (``REDIS_HOST``) or field names (``redis_host``).

        With ``strict=False`` keys that are not ours are ignored (for a Flask config, read
        with a ``SIOCLUSTER_`` prefix by `from_flask`).
        """
        values = dataclasses.asdict(base) if base else {}
        if base:
            values["io_servers"] = list(base.io_servers)
        for key, value in mapping.items():
            name = _field_name(key)
            if name is None:
                if strict:
                    raise ConfigError(_unknown(key))
                continue
            values[name] = _coerce(name, value, key)
        return cls(**values)

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None, *,
                 base: Optional["Config"] = None) -> "Config":
        """Build from ``SIOCLUSTER_<KEY>`` variables; an unknown one is refused."""
        environ = os.environ if environ is None else environ
        mapping = {k[len(ENV_PREFIX):]: v for k, v in environ.items() if k.startswith(ENV_PREFIX)}
        for key in mapping:
            if _field_name(key) is None:
                raise ConfigError(_unknown(ENV_PREFIX + key))
        return cls.from_mapping(mapping, base=base)

    @classmethod
    def from_flask(cls, flask_config: Mapping[str, Any]) -> "Config":
        """Build from a Flask config's ``SIOCLUSTER_*`` keys."""
        mapping = {k[len(ENV_PREFIX):]: v for k, v in flask_config.items()
                   if k.startswith(ENV_PREFIX)}
        return cls.from_mapping(mapping)

    @classmethod
    def argument_parser(cls, parser: Optional[argparse.ArgumentParser] = None,
                        role: Optional[str] = None, **kwargs) -> argparse.ArgumentParser:
        """An argparse parser with a ``--flag`` for each setting (``--redis-url`` ...); with
        a ``role`` (a key of `ROLE_SETTINGS`) its help lists only that node's settings."""
        parser = parser or argparse.ArgumentParser(**kwargs)
        shown = None if role is None else COMMON_SETTINGS | ROLE_SETTINGS[role]
        group = parser.add_argument_group(
            "siocluster settings (also SIOCLUSTER_<KEY>)",
            None if role is None else f"the {role}'s; other nodes' settings are accepted too")
        for f in dataclasses.fields(cls):
            if not f.metadata.get("flag", True):
                continue
            flag = "--" + f.name.replace("_", "-")
            shown_help = f.metadata["help"] if shown is None or f.name in shown \
                else argparse.SUPPRESS
            if f.name == "http_port":
                group.add_argument("--port", "-p", flag, dest=f.name, default=None,
                                   help=shown_help)
            elif f.name == "http_host":
                group.add_argument("--host", flag, dest=f.name, default=None, help=shown_help)
            else:
                group.add_argument(flag, dest=f.name, default=None, help=shown_help)
        return parser

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, base: Optional["Config"] = None) -> "Config":
        """Overlay the flags that were given on ``base``."""
        given = {name: getattr(args, name) for name in cls.setting_names()
                 if getattr(args, name, None) is not None}
        return cls.from_mapping(given, base=base)

    @classmethod
    def load(cls, argv: Optional[List[str]] = None, environ: Optional[Mapping[str, str]] = None,
             parser: Optional[argparse.ArgumentParser] = None, role: Optional[str] = None,
             **overrides):
        """Defaults, then keyword arguments, then the environment, then flags.

        Returns ``(config, args)``; ``args`` holds the parser's other arguments. ``role``:
        `argument_parser`'s.
        """
        parser = cls.argument_parser(parser, role=role)
        args = parser.parse_args(argv)
        try:
            config = cls.from_mapping(overrides) if overrides else cls()
            config = cls.from_env(environ, base=config)
            config = cls.from_args(args, base=config)
        except ConfigError as exc:
            parser.error(str(exc))
        return config, args

    def replace(self, **changes) -> "Config":
        return self.from_mapping(changes, base=self)

    # ---- checking ----------------------------------------------------------------------

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and f.name not in ("redis_options", "io_servers"):
                setattr(self, f.name, _coerce(f.name, value, f.name.upper()))
        self.io_servers = _coerce("io_servers", self.io_servers, "IO_SERVERS")
        if not isinstance(self.redis_options, dict):
            raise ConfigError("REDIS_OPTIONS: must be a mapping of redis-py client options")
        if self.redis_url:
            parse_redis_url(self.redis_url)
        if self.public_url:
            self.public_url = public_url(self.public_url, "PUBLIC_URL")[0]
        if not self.prefix or any(c.isspace() for c in self.prefix):
            raise ConfigError(f"PREFIX: {self.prefix!r} must be a non-empty word")
        positive = ("workers", "pop_timeout", "max_attempts", "call_timeout", "connect_timeout",
                    "ack_timeout", "outbox_size", "max_message_size", "rate_burst",
                    "max_send_backlog", "outbox_max_bytes", "max_attachments",
                    "max_connections", "max_connections_per_address", "handshake_timeout",
                    "policy_max_connections", "inbox_max_bytes", "dead_maxlen",
                    "dead_record_size", "inbox_maxlen", "client_queue_maxlen", "stream_maxlen",
                    "heartbeat_interval", "node_ttl", "recovery_max_packets",
                    "recovery_max_bytes")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name.upper()}: must be above 0, not {getattr(self, name)}")
        if not 0 <= self.shards <= 1024:
            raise ConfigError(f"SHARDS: must be 0 (the default) to 1024, not {self.shards}")
        if self.rate_limit < 0:
            raise ConfigError(f"RATE_LIMIT: must be 0 (off) or above, not {self.rate_limit}")
        if self.recovery_window < 0:
            raise ConfigError(f"RECOVERY_WINDOW: must be 0 (off) or above, not "
                              f"{self.recovery_window}")
        if self.node_ttl <= self.heartbeat_interval:
            raise ConfigError(f"NODE_TTL: {self.node_ttl} must exceed HEARTBEAT_INTERVAL "
                              f"({self.heartbeat_interval}) or live nodes look dead")
        if str(self.log_level).upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"LOG_LEVEL: {self.log_level!r} is not one of DEBUG, INFO, "
                              "WARNING, ERROR")
        self.log_level = str(self.log_level).upper()
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"LOG_FORMAT: {self.log_format!r} is not text or json")
        if not self.client_config_url.startswith("/"):
            raise ConfigError(f"CLIENT_CONFIG_URL: {self.client_config_url!r} must start with /")

    # ---- derived -----------------------------------------------------------------------

    @property
    def effective_redis_url(self) -> str:
        """``redis_url``, or one built from the seed's ``REDIS_*`` keys, or the default."""
        if self.redis_url:
            return self.redis_url
        if not any((self.redis_host, self.redis_port, self.redis_password,
                    self.redis_database, self.redis_username)):
            return defaults.REDIS_URL
        auth = ""
        if self.redis_password or self.redis_username:
            auth = quote(self.redis_username or "", safe="")
            if self.redis_password:
                auth += ":" + quote(self.redis_password, safe="")
            auth += "@"
        return (f"redis://{auth}{self.redis_host or 'localhost'}:{self.redis_port or 6379}"
                f"/{self.redis_database or 0}")

    @property
    def on_redis_cluster(self) -> bool:
        return "+cluster" in self.effective_redis_url.partition("://")[0]

    def keys(self):
        """The cluster's `state.Keys`: its prefix, and its shards on this kind of Redis."""
        from .state import Keys

        cluster = self.on_redis_cluster
        shards = self.shards or (defaults.CLUSTER_SHARDS if cluster else 1)
        return Keys(self.prefix, shards, cluster)

    def redis_client(self, **options):
        """A redis-py client for this cluster, built from the URL and ``redis_options``."""
        return make_redis(self.effective_redis_url, {**self.redis_options, **options})

    def make_node_id(self, role: str) -> str:
        return self.node_id or f"{role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


# ---- helpers -----------------------------------------------------------------------------

_SEED_KEYS = {f.metadata["seed"]: f.name for f in dataclasses.fields(Config)
              if f.metadata.get("seed")}


def _field_name(key: str) -> Optional[str]:
    if key in _SEED_KEYS:
        return _SEED_KEYS[key]
    name = key.lower()
    return name if name in Config.setting_names() else None


def _unknown(key: str) -> str:
    names = [k.upper() for k in Config.setting_names()]
    close = difflib.get_close_matches(key.upper().removeprefix(ENV_PREFIX), names, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"{key}: unknown setting{hint}"


_BOOLS = {"1": True, "true": True, "yes": True, "on": True,
          "0": False, "false": False, "no": False, "off": False}


def _coerce(name: str, value: Any, key: str) -> Any:
    """Turn a value from any source (often a string) into the field's type, or say why not."""
    if name in ("http_port", "redis_port"):
        return port_number(value, key)
    if name == "io_servers":
        return parse_io_servers(value, key)
    if name == "cors_allowed_origins":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: must be a list of origins, not {value!r}")
        return list(value)
    if name == "redis_options":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ConfigError(f"{key}: not valid JSON ({exc})")
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping of redis-py options")
        return value
    default = Config.__dataclass_fields__[name].default
    kind = type(default) if default not in (None, dataclasses.MISSING) else None
    if name == "redis_database":
        kind = int
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            return _BOOLS[str(value).strip().lower()]
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
    except (KeyError, ValueError, TypeError):
        raise ConfigError(f"{key}: {value!r} is not a valid {kind.__name__}")
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{key}: {value!r} must be a string")
    return value


ConfigLike = Union[Config, Mapping[str, Any], None]


def as_config(value: ConfigLike = None, **kwargs) -> Config:
    """Accept a `Config`, a mapping of keys (the seed passed a config module's dict), or None."""
    if isinstance(value, Config):
        return value.replace(**kwargs) if kwargs else value
    config = Config.from_mapping(value or {})
    return config.replace(**kwargs) if kwargs else config
