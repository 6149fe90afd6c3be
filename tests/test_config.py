"""The one config object: sources, the seed's keys, and clear refusals."""

import pytest

from siocluster import Config, ConfigError, IoServer
from siocluster.connection import make_redis, parse_redis_url


def test_defaults():
    config = Config()
    assert config.prefix == "siocluster"
    assert config.effective_redis_url == "redis://localhost:6379/0"
    assert config.client_config_url == "/config.js"
    assert config.io_servers == []


def test_seed_keys_from_a_mapping():
    config = Config.from_mapping({
        "REDIS_HOST": "db.internal", "REDIS_PORT": 6380, "REDIS_PASSWORD": "s3cr@t",
        "REDIS_DATABASE": 2, "HTTP_HOST": "0.0.0.0", "HTTP_PORT": "80",
        "CLIENT_CONFIG_URL": "/cfg.js",
        "IO_SERVERS": [{"internal": "10.0.0.5", "external": "io1.example.com", "port": 8081},
                       {"internal": "10.0.0.6", "external": "io2.example.com", "port": 8082}],
    })
    assert config.effective_redis_url == "redis://:s3cr%40t@db.internal:6380/2"
    assert config.http_port == 80
    assert config.io_servers[0] == IoServer("10.0.0.5", "io1.example.com", 8081)
    assert config.io_servers[1].public() == {"host": "io2.example.com", "port": 8082}


def test_environment_then_flags_override():
    environ = {"SIOCLUSTER_REDIS_URL": "redis://env:6379/1", "SIOCLUSTER_WORKERS": "3",
               "SIOCLUSTER_IO_SERVERS": "10.0.0.5|io1.example.com:8081,io2:8082",
               "OTHER": "ignored"}
    config, _ = Config.load(["--workers", "5", "-p", "9000"], environ=environ)
    assert config.redis_url == "redis://env:6379/1"
    assert config.workers == 5
    assert config.http_port == 9000
    assert [s.public() for s in config.io_servers] == [
        {"host": "io1.example.com", "port": 8081}, {"host": "io2", "port": 8082}]
    assert config.io_servers[0].internal == "10.0.0.5"


def test_keyword_arguments_and_booleans():
    config = Config(connect_timeout_accept="no", rate_limit="2.5", prefix="app1")
    assert config.connect_timeout_accept is False
    assert config.rate_limit == 2.5


@pytest.mark.parametrize("mapping, words", [
    ({"REDIS_HOTS": "x"}, ["REDIS_HOTS", "REDIS_HOST"]),
    ({"HTTP_PORT": "eighty"}, ["HTTP_PORT", "port"]),
    ({"HTTP_PORT": 70000}, ["HTTP_PORT", "65535"]),
    ({"REDIS_URL": "http://localhost"}, ["REDIS_URL", "scheme"]),
    ({"REDIS_URL": "redis://localhost:notaport/0"}, ["REDIS_URL", "malformed"]),
    ({"REDIS_URL": "redis://localhost/abc"}, ["REDIS_URL", "database"]),
    ({"REDIS_URL": "redis+sentinel://s1:26379"}, ["REDIS_URL", "service name"]),
    ({"IO_SERVERS": [{"internal": "a", "port": "x"}]}, ["IO_SERVERS", "port"]),
    ({"IO_SERVERS": [{"host": "a", "port": 1}]}, ["IO_SERVERS", "host"]),
    ({"WORKERS": 0}, ["WORKERS", "above 0"]),
    ({"WORKERS": "1.5"}, ["WORKERS", "int"]),
    ({"NODE_TTL": 1, "HEARTBEAT_INTERVAL": 2}, ["NODE_TTL", "HEARTBEAT_INTERVAL"]),
    ({"CLIENT_CONFIG_URL": "config.js"}, ["CLIENT_CONFIG_URL", "/"]),
    ({"CONNECT_TIMEOUT_ACCEPT": "maybe"}, ["CONNECT_TIMEOUT_ACCEPT", "bool"]),
])
def test_bad_configuration_names_the_key(mapping, words):
    with pytest.raises(ConfigError) as info:
        Config.from_mapping(mapping)
    for word in words:
        assert word in str(info.value)


def test_unknown_environment_variable_is_refused():
    with pytest.raises(ConfigError, match="SIOCLUSTER_REDIS_ULR: unknown setting; did you mean "
                                          "REDIS_URL"):
        Config.from_env({"SIOCLUSTER_REDIS_ULR": "redis://x"})


def test_bad_flag_exits_with_the_key(capsys):
    with pytest.raises(SystemExit) as info:
        Config.load(["--http-port", "-5"], environ={})
    assert info.value.code == 2
    assert "HTTP_PORT" in capsys.readouterr().err


def test_flask_config_prefix():
    config = Config.from_flask({"SIOCLUSTER_PREFIX": "shop", "SECRET_KEY": "x"})
    assert config.prefix == "shop"


def test_redis_urls():
    assert parse_redis_url("rediss://user:pw@host:6380/3") == {"scheme": "rediss"}
    sentinel = parse_redis_url("redis+sentinel://:pw@s1:26379,s2/mymaster/4")
    assert sentinel["sentinels"] == [("s1", 26379), ("s2", 26379)]
    assert (sentinel["service"], sentinel["db"], sentinel["password"]) == ("mymaster", 4, "pw")
    client = make_redis("redis://localhost:6390/5", {"socket_timeout": 3})
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["port"], kwargs["db"], kwargs["socket_timeout"]) == (6390, 5, 3)
    # the socket timeout must stay above a blocking pop's
    assert make_redis("redis://h/0").connection_pool.connection_kwargs["socket_timeout"] > 1


def test_replace_keeps_the_rest():
    config = Config(prefix="a", io_servers=["h:1"])
    other = config.replace(workers=2)
    assert (other.prefix, other.workers, other.io_servers) == ("a", 2, config.io_servers)
    assert config.workers != 2


# ---- IO_SERVERS with public URLs (io-nodes behind a reverse proxy) -------------------------

def test_io_servers_with_public_urls_in_every_spelling():
    as_json = Config.from_env({"SIOCLUSTER_IO_SERVERS": (
        '[{"internal": "10.0.0.5:8081", "url": "wss://chat.example.com/io/1/socket.io/"},'
        ' {"internal": "10.0.0.6", "external": "io2.example.com", "port": 8082}]')})
    as_text = Config.from_env({"SIOCLUSTER_IO_SERVERS": (
        "10.0.0.5:8081|wss://chat.example.com/io/1/socket.io/, 10.0.0.6|io2.example.com:8082")})
    assert as_json.io_servers == as_text.io_servers
    first, second = as_json.io_servers
    assert first == IoServer("10.0.0.5:8081", "chat.example.com", 443,
                             "https://chat.example.com:443/io/1/socket.io/")
    assert first.public() == {"host": "chat.example.com", "port": 443,
                              "url": "https://chat.example.com:443", "path": "/io/1/socket.io/"}
    assert second.public() == {"host": "io2.example.com", "port": 8082}     # as before

    # a bare URL; http and ws; a port of its own; no path is the io-node's own; IPv6
    assert [(s.url, s.internal, s.port) for s in Config(io_servers=[
        "https://Chat.Example.com:8443/io/2", "ws://io.example.com", "http://[2001:db8::7]/x/",
    ]).io_servers] == [
        ("https://chat.example.com:8443/io/2/", "chat.example.com", 8443),
        ("http://io.example.com:80/socket.io/", "io.example.com", 80),
        ("http://[2001:db8::7]:80/x/", "2001:db8::7", 80)]
    assert Config(io_servers=["http://[2001:db8::7]/x/"]).io_servers[0].public()["url"] == \
        "http://[2001:db8::7]:80"


@pytest.mark.parametrize("url, words", [
    ("ftp://chat.example.com/io/1/", ["must start with", "https://, wss://"]),
    ("chat.example.com/io/1/", ["neither host:port nor a URL"]),
    ("https:///io/1/", ["no host"]),
    ("https://0.0.0.0/io/1/", ["every-interface"]),
    ("wss://[::]/io/1/", ["every-interface"]),
    ("https://chat.example.com/io/1/?x=1", ["query or fragment"]),
    ("https://chat.example.com/io/1/#top", ["query or fragment"]),
    ("https://chat.example.com/io 1/", ["path"]),
    ('https://chat.example.com/io/"1"/', ["path"]),
    ("https://chat.example.com:0/io/", ["port 0"]),
    ("https://chat.example.com:99999/io/", ["not a URL", "Port"]),
    ("https://chat.example.com:x/io/", ["not a URL"]),
    ("https://ops:s3cret@chat.example.com/io/", ["user or password", "***@chat.example.com"]),
    (8081, ["not a URL"]),
])
def test_a_bad_io_server_url_names_io_servers_and_what_is_wrong(url, words):
    where = url if isinstance(url, str) and "://" not in url else {"url": url}
    with pytest.raises(ConfigError) as info:
        Config.from_mapping({"IO_SERVERS": [where]})
    message = str(info.value)
    assert message.startswith("IO_SERVERS"), message
    for word in words:
        assert word in message, message
    assert "s3cret" not in message        # a password is not repeated, even to refuse it


def test_an_io_server_has_a_url_or_external_and_port_not_both():
    with pytest.raises(ConfigError, match="IO_SERVERS: an io-node has a url, or an external "
                                          "host and a port, not both"):
        Config(io_servers=[{"url": "https://chat.example.com/io/1/", "port": 443}])
