"""The layout holds: modules readable in one sitting, one owner per Redis protocol, no import
cycle, protocols that never import a node, dependencies' private names only in engine.py (the
server's) and recovering.py (the client's)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "siocluster"
MAX_LINES = 450
# each protocol's scripts in its own module: the inbox's, the cluster state's, recovery's, and the
# command streams' one (it numbers entries of all streams from one sequence)
SCRIPT_OWNERS = {"inbox.py", "state.py", "streams.py", "recovery.py"}
# the Redis protocols and the wire format: they return values, never call into a node
PROTOCOLS = {"envelope", "state", "inbox", "streams", "commands", "outbox", "recovery"}
NODES = {"node", "appnode", "ionode", "app", "reaper", "seed", "cluster", "wsgi", "frontend",
         "policy"}


def modules():
    return sorted(PACKAGE.glob("*.py"))


def siocluster_imports(path: Path):
    """The siocluster modules a module imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("siocluster."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names
                         if alias.name.startswith("siocluster."))
    return found - {path.stem}


def test_every_module_is_readable_in_one_sitting():
    sizes = {path.name: len(path.read_text().splitlines()) for path in modules()}
    assert {name: lines for name, lines in sizes.items() if lines > MAX_LINES} == {}


def test_lua_scripts_live_with_the_protocol_they_serve():
    owners = {path.name for path in modules() if "redis.call(" in path.read_text()}
    assert owners <= SCRIPT_OWNERS and owners


def test_no_import_cycle():
    graph = {path.stem: siocluster_imports(path) for path in modules()}
    graph.pop("__init__")         # names are loaded lazily, on first use

    def visit(module, trail):
        assert module not in trail, " -> ".join([*trail, module])
        for imported in sorted(graph.get(module, ())):
            visit(imported, [*trail, module])

    for module in graph:
        visit(module, [])


def test_protocols_never_import_a_node():
    reaching = {path.stem: siocluster_imports(path) & NODES for path in modules()
                if path.stem in PROTOCOLS}
    assert {module: found for module, found in reaching.items() if found} == {}


def test_private_names_of_others_are_reached_only_in_engine_py():
    """``x._name`` where ``x`` is not ``self``: another object's private state. Only
    engine.py may do it (to python-engineio's, python-socketio's and gevent's objects), and
    recovering.py (to python-socketio's client)."""
    reached = []
    for path in modules():
        if path.name in ("engine.py", "recovering.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id == "self")):
                reached.append(f"{path.name}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                reached += [f"{path.name}:{node.lineno} import {alias.name}"
                            for alias in node.names if alias.name.startswith("_")]
    assert reached == []
