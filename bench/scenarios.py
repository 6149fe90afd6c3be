"""The scenarios, driven from the bench's process: each returns plain figures (a dict).

A scenario tells the generators what to do at a wall-clock time a little ahead, so all of
them start together, and measures a window after a warm-up: while it runs, `Window` reads
the CPU time of every process involved, the time each waited for a CPU, and Redis's
``INFO commandstats``, so every figure comes with who was busy producing it. On a Redis
Cluster (`RedisCluster`) it reads both from every master, and keeps each master's share
too.
"""

import math
import subprocess
import time
from typing import Dict, List, Optional

from bench.stats import Histogram, cpu_seconds, machine_busy_seconds, rss_kib, wait_seconds
from bench.systems import BenchError, Generators, Redis, RedisCluster, System

ROOM_SIZE = 10
LATENCY_GOAL = 0.100       # fan-out: the highest rate held with p99 under this (seconds)
HELD_SEND_RATIO = 0.95     # ... and the generators managed to send this share of the rate


class Window:
    """CPU seconds per group of processes, seconds they waited for a CPU (runnable, not
    running: on a saturated machine, the scheduler's share of every latency), and Redis
    command calls, over a time window;
    on a Redis Cluster, the calls summed over the masters and each master's CPU seconds and
    calls (``redis_masters``)."""

    def __init__(self, groups: Dict[str, List[int]], redis: Optional[Redis]):
        self.groups, self.redis = groups, redis

    def _snapshot(self):
        cpu = {group: sum(cpu_seconds(pid) for pid in pids) for group, pids in self.groups.items()}
        waits = {group: [wait_seconds(pid) for pid in pids] for group, pids in self.groups.items()}
        waits = {group: None if None in values else sum(values) for group, values in waits.items()}
        masters = {}
        if isinstance(self.redis, RedisCluster):
            stats = self.redis.master_commandstats()
            masters = {port: (cpu_seconds(pid), stats[port])
                       for port, pid in self.redis.master_pids.items()}
            calls = RedisCluster.summed(stats)
        else:
            calls = self.redis.commandstats() if self.redis is not None else {}
        return time.monotonic(), machine_busy_seconds(), cpu, calls, masters, waits

    def start(self) -> None:
        self.begin = self._snapshot()

    def stop(self) -> dict:
        end = self._snapshot()
        wall = end[0] - self.begin[0]
        cores = {group: round((end[2][group] - self.begin[2][group]) / wall, 3)
                 for group in self.groups}
        calls = {name: count - self.begin[3].get(name, 0) for name, count in end[3].items()
                 if count - self.begin[3].get(name, 0) > 0}
        # INFO itself and the snapshot's own calls are the bench's, not the system's
        calls.pop("info", None)
        machine = (end[1] - self.begin[1]) / wall
        # what the machine spent on processes not of this bench: the noise of a shared host
        other = max(0.0, machine - sum(cores.values()))
        result = {"seconds": round(wall, 3), "cores": cores, "machine_cores": round(machine, 3),
                  "other_cores": round(other, 3), "redis_calls": calls}
        # how many of the processes' threads were waiting for a CPU, on average
        waiting = {group: round(max(0.0, end[5][group] - self.begin[5][group]) / wall, 3)
                   for group in self.groups
                   if end[5][group] is not None and self.begin[5][group] is not None}
        if waiting:
            result["waiting"] = waiting
            result["waiting_total"] = round(sum(waiting.values()), 3)
        if end[4]:
            result["redis_masters"] = {
                str(port): {"cores": round((cpu - self.begin[4][port][0]) / wall, 3),
                            "calls": sum(count - self.begin[4][port][1].get(name, 0)
                                         for name, count in stats.items() if name != "info")}
                for port, (cpu, stats) in sorted(end[4].items())}
        return result


def process_groups(system: System, generators: Generators, redis: Optional[Redis]):
    groups = dict(system.pids())
    groups["load generator"] = generators.pids
    if redis is not None:
        groups["redis-server"] = redis.pids     # on a Redis Cluster, every master
    return groups


def _timed(generators: Generators, op: str, window: Window, warmup: float, duration: float,
           commands: List[dict]) -> (List[dict], dict):
    """Run ``op`` on every generator from a moment shortly ahead; measure its window."""
    start_at = time.time() + 0.3
    for command in commands:
        command.update(start_at=start_at, warmup=warmup, duration=duration)
    generators.send(op, commands)
    time.sleep(max(0.0, start_at + warmup - time.time()))
    window.start()
    time.sleep(max(0.0, start_at + warmup + duration - time.time()))
    measured = window.stop()
    return generators.collect(op, timeout=duration + 120), measured


def _split(total: int, parts: int) -> List[int]:
    return [total // parts + (1 if n < total % parts else 0) for n in range(parts)]


def connect(generators: Generators, urls: List[str], clients: int, room_size: int = 0,
            concurrency: int = 100, group: str = "default", join: str = "room") -> dict:
    """Open ``clients`` connections over the generators, numbered so rooms stay whole;
    ``join`` is how a client joins its room (the loadgen's ``connect``)."""
    counts = _split(clients, len(generators))
    if room_size:
        # whole rooms per generator, so room numbers are not shared between generators
        rooms = _split(clients // room_size, len(generators))
        counts = [r * room_size for r in rooms]
    firsts = [sum(counts[:n]) for n in range(len(counts))]
    started = time.monotonic()
    replies = generators.each("connect", [
        {"urls": urls, "first": first, "count": count, "room_size": room_size,
         "concurrency": concurrency, "group": group, "join": join}
        for first, count in zip(firsts, counts)],
        timeout=600)
    connected = sum(r["connected"] for r in replies)
    errors = [e for r in replies for e in r["errors"]]
    return {"asked": sum(counts), "connected": connected, "errors": errors[:3],
            "seconds": round(time.monotonic() - started, 3),
            "per_generator": [r["connected"] for r in replies]}


def _shares(rate: float, opened: dict) -> List[dict]:
    """``rate`` split over the generators in proportion to the clients each holds."""
    total = opened["connected"] or 1
    return [{"rate": rate * n / total} for n in opened["per_generator"]]


def _percentiles(hist: Histogram) -> dict:
    def ms(p):
        value = hist.percentile(p)
        return round(value * 1000, 3) if math.isfinite(value) else None
    return {"p50_ms": ms(50), "p99_ms": ms(99)}


def cpu_per_message(window: dict, messages: int) -> Dict[str, float]:
    """Microseconds of CPU per client message, by group of processes, over a window, and
    in all but the load generator (``system``: the system under test and its Redis)."""
    if not messages:
        return {}
    per = {group: round(cores * window["seconds"] * 1e6 / messages, 1)
           for group, cores in window["cores"].items()}
    per["system"] = round(sum(v for group, v in per.items() if group != "load generator"), 1)
    return per


def per_message(calls: Dict[str, int], messages: int) -> dict:
    """Redis commands per client message, by command and in all."""
    if not messages:
        return {"total": None, "by_command": {}}
    by = {name: round(count / messages, 3) for name, count in sorted(calls.items())}
    return {"total": round(sum(calls.values()) / messages, 3), "by_command": by}


def per_master(window: dict, messages: int) -> Optional[Dict[str, dict]]:
    """On a Redis Cluster, each master's CPU microseconds and Redis commands per client
    message and its share of the commands, as ``master 1`` .. ``master N`` in the order of
    their ports (None on one Redis)."""
    masters = window.get("redis_masters")
    if not masters or not messages:
        return None
    calls = sum(m["calls"] for m in masters.values())
    return {f"master {n}": {"port": int(port),
                            "cpu_us_per_message": round(
                                m["cores"] * window["seconds"] * 1e6 / messages, 1),
                            "commands_per_message": round(m["calls"] / messages, 3),
                            "share_of_commands": round(m["calls"] / calls, 3) if calls else None}
            for n, (port, m) in enumerate(sorted(masters.items(), key=lambda i: int(i[0])), 1)}


# ---- systems measured in turns ----------------------------------------------------------

class Target:
    """A running system with the load generator's clients of its own (a group), measured
    while the other systems sit idle."""

    def __init__(self, system: System, redis: Optional[Redis], generators: Generators):
        self.system, self.redis, self.generators = system, redis, generators
        self.name = system.name
        self.groups = process_groups(system, generators, redis)
        self.opened: Optional[dict] = None

    def connect(self, clients: int, room_size: int = 0, join: str = "room") -> dict:
        self.opened = connect(self.generators, self.system.urls, clients, room_size=room_size,
                              group=self.name, join=join)
        if self.opened["connected"] < clients:
            raise BenchError(f"only {self.opened['connected']} of {clients} clients could "
                             f"connect to {self.name}: {self.opened['errors']}")
        return self.opened

    def commands(self, rate: Optional[float] = None, **extra) -> List[dict]:
        """One command per generator for this group; ``rate`` split by clients held."""
        if rate is None:
            return [{"group": self.name, **extra} for _ in range(len(self.generators))]
        return [{**share, "group": self.name, **extra} for share in _shares(rate, self.opened)]

    def timed(self, op: str, warmup: float, duration: float, commands: List[dict]):
        return _timed(self.generators, op, Window(self.groups, self.redis), warmup, duration,
                      commands)

    def close(self) -> None:
        self.generators.run("close", group=self.name)
        self.system.wait_idle()


# ---- echo ---------------------------------------------------------------------------------

def echo_peak(target: Target, warmup: float, duration: float) -> dict:
    replies, window = target.timed("echo", warmup, duration, target.commands())
    acked = sum(r["acked"] for r in replies)
    hist = Histogram.merged(r["hist"] for r in replies)
    return {"round_trips_per_s": round(acked / duration, 1), **_percentiles(hist),
            "errors": sum(r["errors"] for r in replies), "window": window,
            "redis_per_message": per_message(window["redis_calls"], acked)}


def echo_paced(target: Target, rate: float, warmup: float, duration: float) -> dict:
    replies, window = target.timed("echo", warmup, duration, target.commands(rate))
    acked = sum(r["acked"] for r in replies)
    hist = Histogram.merged(r["hist"] for r in replies)
    return {"target_per_s": round(rate, 1), "round_trips_per_s": round(acked / duration, 1),
            **_percentiles(hist), "lost": sum(r["lost"] for r in replies), "window": window}


def echo(targets: List[Target], clients: int, warmup: float, duration: float,
         rounds: int = 2) -> Dict[str, dict]:
    """Round trips: every client emits and waits for its ack (the peak), then an open loop
    at half the peak rate (the latency with room to spare). The systems take turns, each
    measure ``rounds`` times; the best round counts (noise from other work only ever slows
    a system down), and every round is kept."""
    results = {}
    for target in targets:
        results[target.name] = {"clients": clients, "connect": target.connect(clients),
                                "peak_rounds": [], "half_peak_rounds": []}
    try:
        for _ in range(rounds):
            for target in targets:
                results[target.name]["peak_rounds"].append(echo_peak(target, warmup, duration))
        for figures in results.values():
            figures["peak"] = max(figures["peak_rounds"], key=lambda r: r["round_trips_per_s"])
        for _ in range(rounds):
            for target in targets:
                figures = results[target.name]
                half = figures["peak"]["round_trips_per_s"] / 2
                figures["half_peak_rounds"].append(echo_paced(target, half, warmup, duration))
        for figures in results.values():
            figures["half_peak"] = min(figures["half_peak_rounds"], key=_p99_key)
    finally:
        for target in targets:
            target.close()
    return results


def _p99_key(result: dict) -> float:
    return result["p99_ms"] if result["p99_ms"] is not None else float("inf")


# ---- chat fan-out ---------------------------------------------------------------------------

def _room_step(target: Target, op: str, rate: float, step: int, warmup: float,
               duration: float):
    """One measured step of a room load (``fanout`` or ``chat``): the generators' replies,
    the messages sent, the latency histogram (the lost counted infinitely late) and the
    figures both scenarios report."""
    target.generators.run("quiet")
    replies, window = target.timed(op, warmup, duration, target.commands(rate, step=step))
    sent = sum(r["sent"] for r in replies)
    delivered = sum(r["delivered"] for r in replies)
    hist = Histogram.merged(r["hist"] for r in replies)
    lost = max(0, sent * ROOM_SIZE - delivered)
    hist.add_lost(lost)
    result = {"target_in_per_s": round(rate, 1), "in_per_s": round(sent / duration, 1),
              "out_per_s": round(sum(r["delivered_in_window"] for r in replies) / duration, 1),
              **_percentiles(hist), "lost": lost, "window": window,
              "redis_per_message": per_message(window["redis_calls"], sent)}
    masters = per_master(window, sent)
    if masters is not None:
        result["redis_per_master"] = masters
    return replies, sent, hist, result


def fanout_step(target: Target, rate: float, step: int, warmup: float,
                duration: float) -> dict:
    _, sent, hist, result = _room_step(target, "fanout", rate, step, warmup, duration)
    p99 = hist.percentile(99)
    result["held"] = bool(sent >= HELD_SEND_RATIO * rate * duration and p99 < LATENCY_GOAL)
    return result


class _Stepper:
    """The rates one system is tried at: up by ``factor`` while held, then ``refine``
    bisections between the last rate held and the first missed. A miss is tried once
    more before it counts, so one burst of other work does not end the climb."""

    def __init__(self, start: float, factor: float, max_steps: int, refine: int):
        self.rate, self.factor = start, factor
        self.up_left, self.refine_left = max_steps, refine
        self.good: Optional[float] = None
        self.bad: Optional[float] = None
        self.confirming = False
        self.steps: List[dict] = []

    @property
    def done(self) -> bool:
        if self.confirming:
            return False
        if self.bad is None:
            return self.up_left <= 0          # never missed: as high as it was allowed
        return self.refine_left <= 0

    def record(self, result: dict) -> None:
        result["retry"] = self.confirming
        self.steps.append(result)
        if not result["held"] and not self.confirming:
            self.confirming = True        # the same rate once more
            return
        self.confirming = False
        if self.bad is None:
            self.up_left -= 1
            if result["held"]:
                self.good = self.rate
                self.rate *= self.factor
            else:
                self.bad = self.rate
        else:
            self.refine_left -= 1
            if result["held"]:
                self.good = self.rate
            else:
                self.bad = self.rate
        if self.bad is not None and self.refine_left > 0:
            low = self.good if self.good is not None else self.bad / self.factor
            self.rate = (low * self.bad) ** 0.5


def fanout(targets: List[Target], rooms: int, start_rate: float, factor: float,
           max_steps: int, refine: int, warmup: float, duration: float) -> Dict[str, dict]:
    """Rooms of ten, members spread over each system's servers, every member sending; the
    rate of messages in steps up until p99 delivery latency passes 100 ms, then is refined
    between the last rate held and the first missed. The systems take their steps in
    turns, so the noise of a shared machine falls on all of them alike."""
    clients = rooms * ROOM_SIZE
    results = {}
    for target in targets:
        results[target.name] = {"rooms": rooms, "room_size": ROOM_SIZE, "clients": clients,
                                "connect": target.connect(clients, room_size=ROOM_SIZE)}
    _climb(targets, results, fanout_step, start_rate, factor, max_steps, refine, warmup,
           duration)
    return results


def _climb(targets: List[Target], results: Dict[str, dict], step_fn, start_rate: float,
           factor: float, max_steps: int, refine: int, warmup: float, duration: float) -> None:
    """Each target's rate ladder (`_Stepper`), the targets taking their steps in turns;
    ``step_fn(target, rate, step, warmup, duration)`` measures one step. Closes the
    targets' clients, and adds the steps and the best held to ``results``."""
    steppers = {target.name: _Stepper(start_rate, factor, max_steps, refine)
                for target in targets}
    step = 0
    try:
        while not all(s.done for s in steppers.values()):
            for target in targets:
                stepper = steppers[target.name]
                if stepper.done:
                    continue
                step += 1
                stepper.record(step_fn(target, stepper.rate, step, warmup, duration))
    finally:
        for target in targets:
            target.close()
    for name, figures in results.items():
        steps = steppers[name].steps
        held = [s for s in steps if s["held"]]
        figures.update(best_held=max(held, key=lambda s: s["out_per_s"]) if held else None,
                       peak_out_per_s=max(s["out_per_s"] for s in steps), steps=steps,
                       # never missed a step: "held" is what the ladder allowed, not a limit
                       ladder_exhausted=steppers[name].bad is None)


# ---- the example chat -----------------------------------------------------------------------

def chat_step(target: Target, rate: float, step: int, warmup: float, duration: float) -> dict:
    """One step of the example chat: every member says something, ``rate`` messages per
    second in all. Held when the generators sent at least 95% of the rate, nothing was lost
    and the p99 delivery latency is under 100 ms."""
    replies, sent, hist, result = _room_step(target, "chat", rate, step, warmup, duration)
    lost = result["lost"]
    result.update(acks={key: sum(r[key] for r in replies)
                        for key in ("acked", "refused", "unanswered")},
                  refusals=[x for r in replies for x in r["refusals"]][:3],
                  cpu_us_per_message=cpu_per_message(result["window"], sent))
    p99 = hist.percentile(99)
    result["held"] = bool(sent >= HELD_SEND_RATIO * rate * duration and lost == 0
                          and p99 < LATENCY_GOAL)
    return result


def chat(targets: List[Target], rooms: int, start_rate: float, factor: float, max_steps: int,
         refine: int, warmup: float, duration: float) -> Dict[str, dict]:
    """The example chat's own protocol on each system: rooms of ten, members spread over
    the system's servers, each joining with ``join {name, room}``, then every member saying
    something (``say {text}``) at a rate that climbs as fan-out's does."""
    clients = rooms * ROOM_SIZE
    results = {}
    for target in targets:
        results[target.name] = {"rooms": rooms, "room_size": ROOM_SIZE, "clients": clients,
                                "connect": target.connect(clients, room_size=ROOM_SIZE,
                                                          join="chat")}
    _climb(targets, results, chat_step, start_rate, factor, max_steps, refine, warmup, duration)
    return results


# ---- idle connections -----------------------------------------------------------------------

def connections(system: System, generators: Generators, pid: int, clients: int,
                settle: float = 2.0) -> dict:
    """Idle websocket connections on one server process (``pid``) and its RSS each."""
    # a first crowd loads every code path and fills the allocator's pools
    warm = connect(generators, system.urls[:1], 10 * len(generators))
    generators.run("close")
    if warm["connected"] == 0:
        raise BenchError(f"connections: no client could connect to {system.name}: "
                         f"{warm['errors']}")
    system.wait_idle()
    time.sleep(settle)
    before = rss_kib(pid)
    opened = connect(generators, system.urls[:1], clients, concurrency=50)
    time.sleep(settle)
    after = rss_kib(pid)
    alive = sum(r["alive"] for r in generators.run("alive"))
    generators.run("close")
    system.wait_idle()
    held = min(alive, opened["connected"])
    return {"asked": clients, "held": held, "connect_seconds": opened["seconds"],
            "connects_per_s": round(opened["connected"] / opened["seconds"], 1)
            if opened["seconds"] else None,
            "errors": opened["errors"], "rss_before_kib": before, "rss_after_kib": after,
            "rss_per_connection_kb": round((after - before) * 1.024 / held, 2) if held else None}


# ---- the raw Redis ceiling ------------------------------------------------------------------

PAYLOAD = "x" * 300        # about the size of an envelope or command batch in the hot path

REDIS_COMMANDS = {
    # name as INFO commandstats reports it: the command line redis-benchmark runs
    "lpush": ["LPUSH", "bench:inbox", PAYLOAD],
    "blmove": ["BLMOVE", "bench:inbox", "bench:inbox", "RIGHT", "LEFT", "1"],
    "lrem": ["LREM", "bench:processing", "1", "absent"],
    "xadd": ["XADD", "bench:commands", "MAXLEN", "~", "100000", "*", "b", PAYLOAD],
    "xread": ["XREAD", "COUNT", "10", "STREAMS", "bench:commands", "0-0"],
}


def redis_ceiling(redis: Redis, requests: int, pipeline: int = 16) -> dict:
    """``redis-benchmark`` on the bench's redis-server for the hot path's commands: one
    command per round trip, and ``pipeline`` per round trip."""
    import shutil

    exe = shutil.which("redis-benchmark")
    if exe is None:
        raise BenchError("redis-benchmark is not installed: it comes with redis-server "
                         "(Debian's redis-tools); run `make install`")
    results = {}
    for name, command in REDIS_COMMANDS.items():
        row = {}
        for depth in (1, pipeline):
            out = subprocess.run(
                [exe, "-h", "127.0.0.1", "-p", str(redis.port), "-c", "50",
                 "-n", str(requests * depth), "-P", str(depth), "--csv", *command],
                capture_output=True, text=True, timeout=300)
            lines = [ln for ln in out.stdout.splitlines() if ln and not ln.startswith('"test"')]
            if out.returncode != 0 or not lines:
                raise BenchError(f"redis-benchmark {name} failed: {out.stderr or out.stdout}")
            row[f"ops_per_s_p{depth}"] = float(lines[-1].split('","')[1])
        results[name] = row
    redis.flush()
    return {"requests": requests, "pipeline": pipeline, "clients": 50, "commands": results}


def redis_bound(per_msg: Dict[str, float], ceiling: dict, key: str = "ops_per_s_p1") -> \
        Optional[float]:
    """Client messages per second Redis could serve if it did nothing but these commands,
    at the rates redis-benchmark measured; commands it did not measure count as LPUSH."""
    if not per_msg:
        return None
    commands = ceiling["commands"]
    seconds = 0.0
    for name, count in per_msg.items():
        rate = commands.get(name, commands["lpush"])[key]
        seconds += count / rate
    return round(1 / seconds, 1) if seconds else None
