"""What a bench run tells: the machine it ran on, the side-by-side table, and the goals.

`machine()` describes the host (cores, CPU model, memory, Python, package versions, load);
`table(results)` renders the figures of all systems with siocluster's as ratios to the
others; `goals(results)` checks the issue's targets. The JSON file holds all of it plus
every step's raw figures.
"""

import importlib.metadata
import math
import os
import platform
import subprocess
import sys
from typing import List, Optional

from bench.systems import ROOT

PACKAGES = ("siocluster", "python-socketio", "python-engineio", "gevent", "gevent-websocket",
            "redis", "websocket-client")
SIOCLUSTER, SINGLE, REDISMANAGER = "siocluster", "single process", "RedisManager"
NODE = "Node socket.io"
# the example chat's siocluster (as make run-cluster runs it) on a Redis Cluster
SIOCLUSTER_RC = "siocluster on Redis Cluster"
SYSTEMS = (SIOCLUSTER, SIOCLUSTER_RC, SINGLE, REDISMANAGER, NODE)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def machine(redis_version: Optional[str] = None) -> dict:
    model = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown")
    mem_kib = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                    if line.startswith("MemTotal:")), 0)
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        commit = ""
    return {"cores": os.cpu_count(), "cpu_model": model, "memory_gib": round(mem_kib / 2**20, 1),
            "python": platform.python_version(),
            # the interpreter itself: builds differ (one with PGO and LTO runs the nodes faster)
            "python_executable": os.path.realpath(sys.executable),
            "platform": platform.platform(),
            "packages": versions, "redis_server": redis_version, "commit": commit or None}


# ---- the table ------------------------------------------------------------------------------

def _get(data, *path):
    for key in path:
        if not isinstance(data, dict) or data.get(key) is None:
            return None
        data = data[key]
    return data


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.2f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _ratio(ours, theirs) -> str:
    if not ours or not theirs:
        return "-"
    return f"{ours / theirs:.2f}x"


ROWS = [
    # label, path in a system's results; None marks a section heading
    ("echo", None),
    ("round trips/s (peak)", ("echo", "peak", "round_trips_per_s")),
    ("p50 ms at peak", ("echo", "peak", "p50_ms")),
    ("p99 ms at peak", ("echo", "peak", "p99_ms")),
    ("round trips/s at half peak", ("echo", "half_peak", "round_trips_per_s")),
    ("p50 ms at half peak", ("echo", "half_peak", "p50_ms")),
    ("p99 ms at half peak", ("echo", "half_peak", "p99_ms")),
    ("Redis commands per round trip", ("echo", "peak", "redis_per_message", "total")),
    ("load generator cores at peak (all processes)",
     ("echo", "peak", "window", "cores", "load generator")),
    ("machine cores busy at peak", ("echo", "peak", "window", "machine_cores")),
    ("  of which other work's", ("echo", "peak", "window", "other_cores")),
    ("chat fan-out (rooms of 10, p99 < 100 ms)", None),
    ("messages in/s held", ("fanout", "best_held", "in_per_s")),
    ("deliveries out/s held", ("fanout", "best_held", "out_per_s")),
    ("p50 ms delivery at that rate", ("fanout", "best_held", "p50_ms")),
    ("p99 ms delivery at that rate", ("fanout", "best_held", "p99_ms")),
    ("deliveries out/s, highest step", ("fanout", "peak_out_per_s")),
    ("Redis commands per message in", ("fanout", "best_held", "redis_per_message", "total")),
    ("load generator cores (all processes)",
     ("fanout", "best_held", "window", "cores", "load generator")),
    ("machine cores busy", ("fanout", "best_held", "window", "machine_cores")),
    ("  of which other work's", ("fanout", "best_held", "window", "other_cores")),
    ("threads waiting for a CPU, on average",
     ("fanout", "best_held", "window", "waiting_total")),
    ("idle connections on one server process", None),
    ("connections held", ("connections", "held")),
    ("RSS KB per connection", ("connections", "rss_per_connection_kb")),
    ("connects/s", ("connections", "connects_per_s")),
]


# the chat scenario runs on systems of its own (siocluster as make run-cluster runs it, the
# chat on RedisManager, Node's socket.io): a table of its own
CHAT_ROWS = [
    ("example chat: join, say, said (rooms of 10, p99 < 100 ms, nothing lost)", None),
    ("messages in/s held", ("chat", "best_held", "in_per_s")),
    ("deliveries/s held", ("chat", "best_held", "out_per_s")),
    ("p50 ms delivery at that rate", ("chat", "best_held", "p50_ms")),
    ("p99 ms delivery at that rate", ("chat", "best_held", "p99_ms")),
    ("deliveries/s, highest step", ("chat", "peak_out_per_s")),
    ("CPU us per message in: io-nodes", ("chat", "best_held", "cpu_us_per_message", "io-node")),
    ("CPU us per message in: app-nodes",
     ("chat", "best_held", "cpu_us_per_message", "app-node")),
    ("CPU us per message in: servers", ("chat", "best_held", "cpu_us_per_message", "server")),
    ("CPU us per message in: redis-server",
     ("chat", "best_held", "cpu_us_per_message", "redis-server")),
    ("CPU us per message in: all of the system",
     ("chat", "best_held", "cpu_us_per_message", "system")),
    ("CPU us per message in: load generator",
     ("chat", "best_held", "cpu_us_per_message", "load generator")),
    ("Redis commands per message in", ("chat", "best_held", "redis_per_message", "total")),
    ("machine cores busy", ("chat", "best_held", "window", "machine_cores")),
    ("  of which other work's", ("chat", "best_held", "window", "other_cores")),
    ("threads waiting for a CPU, on average", ("chat", "best_held", "window", "waiting_total")),
]


def table(results: dict) -> str:
    """The side-by-side table: echo, fan-out and connections, then the example chat."""
    blocks = [_table(results, ROWS), _table(results, chat_rows(results))]
    return "\n\n".join(block for block in blocks if block)


def chat_rows(results: dict) -> list:
    """`CHAT_ROWS`, with each master's Redis CPU and commands per message under the
    totals when a system ran on a Redis Cluster."""
    masters = max((len(step.get("redis_per_master") or {})
                   for figures in results["systems"].values()
                   for step in (_get(figures, "chat", "steps") or [])), default=0)
    if not masters:
        return CHAT_ROWS
    rows = []
    for label, path in CHAT_ROWS:
        rows.append((label, path))
        if path and path[-1] == "redis-server":
            rows += [(f"  redis-server master {n} of {masters}",
                      ("chat", "best_held", "redis_per_master", f"master {n}",
                       "cpu_us_per_message")) for n in range(1, masters + 1)]
        elif path and path[-2:] == ("redis_per_message", "total"):
            rows += [(f"  on master {n} of {masters}",
                      ("chat", "best_held", "redis_per_master", f"master {n}",
                       "commands_per_message")) for n in range(1, masters + 1)]
    return rows


def _table(results: dict, spec: list) -> str:
    """``spec``'s rows for the systems that have a figure in them, siocluster's as ratios
    to the others'; empty when none has."""
    paths = [path for _, path in spec if path is not None]
    systems = [s for s in SYSTEMS if s in results["systems"]
               and any(_get(results["systems"][s], *path) is not None for path in paths)]
    if not systems:
        return ""
    header = ["", *systems]
    if SIOCLUSTER in systems:
        header += [f"vs {s}" for s in systems if s != SIOCLUSTER]
    rows: List[List[str]] = []
    for label, path in spec:
        if path is None:
            rows.append([f"[{label}]"])
            continue
        values = [_get(results["systems"][s], *path) for s in systems]
        if all(v is None for v in values):
            continue
        row = [label, *(_fmt(v) for v in values)]
        if SIOCLUSTER in systems:
            ours = values[systems.index(SIOCLUSTER)]
            row += [_ratio(ours, values[i]) for i, s in enumerate(systems) if s != SIOCLUSTER]
        rows.append(row)
    # a heading without figures under it (a scenario not run) goes
    rows = [row for n, row in enumerate(rows)
            if len(row) > 1 or (n + 1 < len(rows) and len(rows[n + 1]) > 1)]
    # headings stand on lines of their own: they do not widen the first column
    widths = [max(len(r[i]) for r in [header, *rows] if len(r) > max(i, 1))
              for i in range(len(header))]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in
                       enumerate(zip(header, widths)))]
    for row in rows:
        if len(row) == 1:
            lines.append(row[0])
            continue
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                               enumerate(zip(row, widths))))
    return "\n".join(lines)


def redis_table(results: dict) -> str:
    ceiling = results.get("redis_ceiling")
    if not ceiling:
        return ""
    depth = ceiling["pipeline"]
    lines = [f"{'command':<8} {'ops/s, 1 per round trip':>24} "
             f"{f'ops/s, {depth} per round trip':>25}"]
    for name, row in ceiling["commands"].items():
        lines.append(f"{name:<8} {row['ops_per_s_p1']:>24,.0f} "
                     f"{row[f'ops_per_s_p{depth}']:>25,.0f}")
    for label, key in (("echo", "echo_round_trips_per_s"), ("chat", "fanout_messages_in_per_s")):
        bound = ceiling.get("bound", {}).get(key)
        ours = ceiling.get("measured", {}).get(key)
        if bound:
            lines.append(f"{label}: siocluster's commands per message allow {bound:,.0f}/s from "
                         f"Redis alone; measured {_fmt(ours)}/s ({_ratio(ours, bound)} of it)")
    return "\n".join(lines)


# ---- the goals of the issue -------------------------------------------------------------------

def goals(results: dict) -> List[dict]:
    systems = results["systems"]
    ours = systems.get(SIOCLUSTER, {})
    out = []

    def goal(name, value, target, ok):
        out.append({"goal": name, "value": value, "target": target,
                    "met": None if ok is None else bool(ok)})

    fan = _get(ours, "fanout", "best_held", "out_per_s")
    for other, factor in ((REDISMANAGER, 1.5), (SINGLE, 0.5)):
        theirs = _get(systems.get(other, {}), "fanout", "best_held", "out_per_s")
        ratio = round(fan / theirs, 2) if fan and theirs else None
        # a system that never missed a step was not measured to its limit: no verdict
        capped = any(_get(systems.get(name, {}), "fanout", "ladder_exhausted")
                     for name in (SIOCLUSTER, other))
        goal(f"fan-out deliveries/s >= {factor}x {other}", ratio, factor,
             None if ratio is None or capped else ratio >= factor)
    p99 = _get(ours, "echo", "half_peak", "p99_ms")
    goal("echo p99 ms at half the peak rate < 20", p99, 20, None if p99 is None else p99 < 20)
    held = _get(ours, "connections", "held")
    goal("idle connections held on one io-node >= 10,000", held, 10000,
         None if held is None else held >= 10000)
    rss = _get(ours, "connections", "rss_per_connection_kb")
    goal("RSS KB per idle connection < 40", rss, 40, None if rss is None else rss < 40)
    return out


def goals_table(items: List[dict]) -> str:
    marks = {True: "met", False: "NOT met", None: "not measured"}
    return "\n".join(f"{marks[g['met']]:>12}  {g['goal']}: {_fmt(g['value'])}" for g in items)


def ladder_warnings(results: dict) -> List[str]:
    """A line for each system whose fan-out or chat never missed a step (raise
    --fanout-steps)."""
    return [f"{name}: {label} held every step up to the last; its figures are a lower bound "
            f"(raise --fanout-steps)" for name, figures in results["systems"].items()
            for label, key in (("fan-out", "fanout"), ("chat", "chat"))
            if _get(figures, key, "ladder_exhausted")]


def ties(results: dict) -> List[str]:
    """A line for each baseline whose highest step held in fan-out or chat is siocluster's
    own: the ratio between them is then within the ladder's resolution, not a ranking."""
    lines = []
    for label, key in (("fan-out", "fanout"), ("chat", "chat")):
        ours = _get(results["systems"].get(SIOCLUSTER, {}), key, "best_held", "target_in_per_s")
        for name, figures in results["systems"].items():
            if name != SIOCLUSTER and ours is not None \
                    and _get(figures, key, "best_held", "target_in_per_s") == ours:
                lines.append(f"{SIOCLUSTER} and {name} held the same {label} step "
                             f"({_fmt(ours)} messages in/s): the ratio between them is within "
                             f"the ladder's resolution (--fanout-refine tells them apart finer)")
    return lines


def skipped(results: dict) -> List[str]:
    """A line for each system a scenario skipped (Node without node or its packages), and
    for each whose chat held no step."""
    lines = []
    for name, figures in results["systems"].items():
        reason = _get(figures, "chat", "skipped")
        if reason:
            lines.append(f"{name}: chat skipped: {reason}")
        elif _get(figures, "chat", "steps") and not _get(figures, "chat", "best_held"):
            first = figures["chat"]["steps"][0]
            lines.append(f"{name}: chat held no step (the first: {_fmt(first['in_per_s'])} "
                         f"messages in/s, p99 {_fmt(first['p99_ms'])} ms, {first['lost']:,} "
                         f"lost, acks {first['acks']})")
    return lines
