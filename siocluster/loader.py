"""Finding the `App` an entry point runs: ``package.module:attr`` naming a `siocluster.App`,
a port's object that wraps one (`siocluster.flask_socketio.SocketIO`), or the Flask app one
was made for; and, when it is something else, what to change."""

import importlib
import sys
from typing import Optional

from .app import App


def import_entry(path: str, who: str):
    """``(module, attr)`` of ``package.module:attr``; an import that fails is a SystemExit
    that says why (naming a folder that hides the installed package, when one does)."""
    module_name, _, attr = path.partition(":")
    try:
        return importlib.import_module(module_name), attr
    except ImportError as exc:
        raise SystemExit(f"{who}: cannot import {module_name!r}: {exc}{shadowed()}")
    except AttributeError as exc:
        if not shadowed():
            raise
        raise SystemExit(f"{who}: cannot import {module_name!r}: {exc}{shadowed()}")


def load_app(path: str) -> App:
    """Import ``package.module:attr`` (``attr`` defaults to ``app``): a `siocluster.App`, a
    `siocluster.flask_socketio.SocketIO`, or a Flask app one was made for."""
    module, attr = import_entry(path, "app-node")
    found = getattr(module, attr or "app", None)
    app = as_app(found)
    if app is None:
        raise SystemExit(f"app-node: {path!r} is not a siocluster.App (found "
                         f"{type(found).__name__}){wrong_server(found)}")
    return app


def as_app(value) -> Optional[App]:
    """The `App` of ``value``: itself, what a port of another API wraps (its
    ``siocluster_app``, as `siocluster.flask_socketio.SocketIO` has), or that of the
    ``SocketIO`` a Flask app was given (``app.extensions["socketio"]``)."""
    if isinstance(value, App):
        return value
    wrapped = getattr(value, "siocluster_app", None)
    if isinstance(wrapped, App):
        return wrapped
    extensions = getattr(value, "extensions", None)
    if isinstance(extensions, dict) and "socketio" in extensions:
        return as_app(extensions["socketio"])
    return None


def wrong_server(value) -> str:
    """What to change when ``value`` is another library's server, not siocluster's."""
    try:
        extensions = getattr(value, "extensions", None)
    except RuntimeError:
        return ""           # a proxy such as flask.request, outside a request
    if isinstance(extensions, dict) and "socketio" in extensions:
        value = extensions["socketio"]      # a Flask app: the SocketIO it was given
    module, name = type(value).__module__ or "", type(value).__name__
    if module.startswith("flask_socketio") and name == "SocketIO":
        return (": it is Flask-SocketIO's SocketIO; import it from siocluster.flask_socketio "
                "instead of flask_socketio (docs/porting.md)")
    if module.startswith("socketio") and name in ("Server", "AsyncServer"):
        return (": it is a python-socketio server; make it with `siocluster.App()` instead of "
                "`socketio.Server(...)` (docs/porting.md)")
    return ""


def shadowed() -> str:
    """When ``siocluster`` was imported from a folder without the package's modules (a
    checkout's top directory in the current directory, found before an editable install):
    what happened and what to do; else an empty string."""
    package = sys.modules.get("siocluster")
    if package is None or getattr(package, "__file__", None):
        return ""
    folders = ", ".join(getattr(package, "__path__", None) or []) or "a folder"
    return (f". `siocluster` was imported from {folders}, a folder named siocluster without "
            "the package's modules, which hides the installed package (a checkout's top "
            "directory in the current directory does that to an editable install): run from "
            "another directory, or install siocluster with `pip install .` or `pip install -e "
            ". --config-settings editable_mode=compat` (docs/porting.md, Troubleshooting)")
