"""The policy server: tells Flash clients which io-node ports their sockets may use.

A Flash socket (the legacy transport of old Socket.IO clients) first connects to port 843
of the host it wants, sends ``<policy-file-request/>`` and a NUL byte, and reads a
cross-domain policy back. This is a plain `gevent.server.StreamServer`; it needs no Redis.

    server = PolicyServer(("0.0.0.0", 843), ports=[8081, 8082])
    server.serve_forever()

Run it with ``python policy_server.py --host 0.0.0.0 --allow-ports 8081,8082`` (port 843
needs root or CAP_NET_BIND_SERVICE; ``--port`` picks another).
"""

import argparse
import logging
from typing import Iterable, List, Optional

import gevent
from gevent.pool import Pool
from gevent.server import StreamServer

from . import defaults, logs
from .config import Config, ConfigError, ConfigLike, as_config
from .entry import listen_error, wait_for_signal
from .net import parse_ports

REQUEST = b"<policy-file-request/>"

logger = logging.getLogger("siocluster.policy")


def policy_xml(ports: Optional[Iterable[int]] = None) -> bytes:
    """The bytes sent to a Flash client, NUL included: access from any domain to ``ports``.

    ``policy_xml([8081, 8082])`` is ``<cross-domain-policy><allow-access-from domain="*"
    to-ports="8081,8082"/></cross-domain-policy>`` followed by ``\\0``; with no ports every
    port (``*``) is allowed.
    """
    to_ports = ",".join(str(int(p)) for p in dict.fromkeys(ports or ())) or "*"
    return (f'<cross-domain-policy><allow-access-from domain="*" to-ports="{to_ports}"/>'
            f"</cross-domain-policy>\0").encode()


class PolicyServer(StreamServer):
    """Answers ``<policy-file-request/>\\0`` with `policy_xml` and closes the connection.

    :param listener: ``(host, port)``, or a listening socket; default: the config's
        ``HTTP_HOST`` on port 843.
    :param ports: io-node ports to allow; default: the ports of the config's ``IO_SERVERS``,
        else every port (logged as a warning).
    :param config: a `Config` or a mapping of its keys.
    :param timeout: seconds a client has to send its whole request before it is dropped.
    :param max_request: bytes a request may take; a client sending more is cut off.

    Anything other than the request is answered with nothing. At most the config's
    ``POLICY_MAX_CONNECTIONS`` clients are served at once (a ``gevent.pool.Pool``); more
    wait, unaccepted, until one is done, which takes at most ``timeout``. Other keyword
    arguments go to `StreamServer` (``spawn=`` replaces the pool). `start()`, `stop()`,
    `serve_forever()`, `full()` and `address` are the `StreamServer`'s own.
    """

    def __init__(self, listener=None, ports: Optional[Iterable[int]] = None,
                 config: ConfigLike = None, timeout: float = defaults.POLICY_TIMEOUT,
                 max_request: int = defaults.POLICY_MAX_REQUEST, **kwargs):
        config = as_config(config)
        if listener is None:
            listener = (config.http_host, defaults.POLICY_PORT)
        # each client holds a greenlet up to `timeout`: without a pool, a flood of silent
        # connections would hold as many as it opens
        kwargs.setdefault("spawn", Pool(config.policy_max_connections))
        super().__init__(listener, **kwargs)
        self.ports: List[int] = list(ports or [s.port for s in config.io_servers])
        if not self.ports:
            logger.warning("policy server: no io-node ports given (--allow-ports or "
                           "IO_SERVERS): Flash clients may connect to every port")
        self.answer = policy_xml(self.ports)
        self.timeout = timeout
        self.max_request = max_request

    def handle(self, sock, address):
        try:
            with gevent.Timeout(self.timeout):
                if self._read_request(sock):
                    sock.sendall(self.answer)
        except gevent.Timeout:
            logger.debug("policy server: %s sent no request in %ss", address, self.timeout)
        except OSError:
            pass    # the client hung up first: nothing to answer
        # StreamServer closes the socket when this returns

    def _read_request(self, sock) -> bool:
        """Read up to the NUL; False as soon as the bytes cannot be the request."""
        data = b""
        while b"\0" not in data:
            chunk = sock.recv(self.max_request + 1 - len(data))
            data += chunk
            if not chunk or len(data) > self.max_request or not _may_be_request(data):
                return False
        return data.partition(b"\0")[0].strip() == REQUEST


def _may_be_request(data: bytes) -> bool:
    # whitespace around the request is tolerated (a newline typed in telnet while testing)
    head = data.partition(b"\0")[0].lstrip()
    return REQUEST.startswith(head) or (head.startswith(REQUEST)
                                        and not head[len(REQUEST):].strip())


def main(argv=None) -> None:
    """Command line of ``python policy_server.py``; SIGTERM or SIGINT stops it."""
    parser = argparse.ArgumentParser(
        prog="python policy_server.py",
        description="Answer Flash's cross-domain policy requests for the io-node ports.")
    parser.add_argument("--host", help="address to listen on (default: SIOCLUSTER_HTTP_HOST, "
                                       "else 127.0.0.1; 0.0.0.0 serves other machines)")
    parser.add_argument("--port", "-p", type=int, default=defaults.POLICY_PORT,
                        help=f"port to listen on (default: {defaults.POLICY_PORT}, which "
                             "needs root or CAP_NET_BIND_SERVICE)")
    parser.add_argument("--allow-ports", type=parse_ports, metavar="PORT,...",
                        help="io-node ports Flash clients may use (default: the ports of "
                             "SIOCLUSTER_IO_SERVERS, else every port)")
    parser.add_argument("--timeout", type=float, default=defaults.POLICY_TIMEOUT,
                        help="seconds a client has to send its request (default: %(default)s)")
    parser.add_argument("--max-request", type=int, default=defaults.POLICY_MAX_REQUEST,
                        help="bytes a request may take (default: %(default)s)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR (default: "
                                            "SIOCLUSTER_LOG_LEVEL, else INFO)")
    parser.add_argument("--log-format", help="text, or json: one event a line (default: "
                                             "SIOCLUSTER_LOG_FORMAT, else text)")
    args = parser.parse_args(argv)
    if not 0 <= args.port < 65536:
        parser.error(f"--port: {args.port} is not a port number (0-65535)")
    if args.timeout <= 0 or args.max_request < len(REQUEST) + 1:
        parser.error(f"--timeout must be above 0 and --max-request at least {len(REQUEST) + 1}")
    try:
        config = Config.from_env()
        config = config.replace(**{k: v for k, v in (("log_level", args.log_level),
                                                      ("log_format", args.log_format)) if v})
    except ConfigError as exc:
        parser.error(str(exc))
    logs.setup(config, "policy")
    logs.identify(config.node_id or "policy")

    host = args.host or config.http_host
    server = PolicyServer((host, args.port), ports=args.allow_ports, config=config,
                          timeout=args.timeout, max_request=args.max_request)
    try:
        server.start()
    except OSError as exc:
        raise SystemExit(listen_error("policy server", exc, host, args.port,
                                      f" and forward {defaults.POLICY_PORT} to it"))
    logger.info("policy server listening on %s:%s, allowing ports %s", *server.address[:2],
                ",".join(map(str, server.ports)) or "*")

    wait_for_signal()
    logger.info("policy server stopping")
    server.stop(timeout=args.timeout)
