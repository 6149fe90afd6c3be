"""The error of a configuration that cannot work, in a module of its own so that every module
checking a setting (`config`, `connection`, `net`) can raise it without importing another."""


class ConfigError(ValueError):
    """Raised at start for configuration that cannot work; the message names the key."""
