"""``python -m bench`` (``make bench``): siocluster and its baselines, side by side.

Starts its own redis-server, each system in turn (siocluster's io-nodes and app-nodes;
one python-socketio process; two python-socketio processes sharing a RedisManager; for the
chat scenario, two Node socket.io processes with the Redis adapter too) and load generator
processes, runs the scenarios, prints a table and writes every figure with the command and
the machine to ``bench/results/bench-<time>.json``::

    python -m bench                      # the full run: about 14 minutes on 2 cores
    python -m bench --quick              # tiny sizes: checks that it works
    python -m bench --scenarios echo,fanout --systems siocluster,single
    python -m bench --scenarios chat --systems siocluster,redismanager,node
    python -m bench --scenarios chat --systems siocluster,siocluster-redis-cluster

``siocluster-redis-cluster`` (the chat scenario's only, and not in the default run) is the
example chat's siocluster on a Redis Cluster of its own (``--redis-cluster-masters``, 3 by
default, no replicas; siocluster's default shards on a cluster), beside ``siocluster`` on
one redis-server: its Redis CPU and commands per message are summed over the masters, and
each master's are shown under them.

BENCHMARKS.md says what each figure means.
"""

import argparse
import json
import os
import shlex
import sys
import tempfile
import time

from bench import report, scenarios
from bench.report import NODE, REDISMANAGER, SINGLE, SIOCLUSTER, SIOCLUSTER_RC
from bench.systems import (
    ROOT,
    BenchError,
    Generators,
    Redis,
    RedisCluster,
    node_ready,
    node_versions,
    raise_file_limit,
    start_baseline,
    start_cluster,
    start_node,
    start_run_cluster,
)

SCENARIOS = ("redis", "echo", "fanout", "chat", "connections")
SYSTEM_NAMES = {"siocluster": SIOCLUSTER, "single": SINGLE, "redismanager": REDISMANAGER,
                "node": NODE, "siocluster-redis-cluster": SIOCLUSTER_RC}
# what runs without --systems: all but the Redis Cluster (chosen by name only)
DEFAULT_SYSTEMS = ("siocluster", "single", "redismanager", "node")
# the systems each scenario runs on, of those chosen with --systems
ECHO_SYSTEMS = (SIOCLUSTER, SINGLE, REDISMANAGER)
CHAT_SYSTEMS = (SIOCLUSTER, SIOCLUSTER_RC, REDISMANAGER, NODE)
CONNECTION_SYSTEMS = (SIOCLUSTER, SINGLE)

FULL = {"duration": 5.0, "warmup": 1.0, "echo_clients": 200, "echo_rounds": 2, "rooms": 30,
        "fanout_start": 100.0, "fanout_factor": 1.5, "fanout_steps": 20, "fanout_refine": 2,
        "connections": 10000, "redis_requests": 50000}
QUICK = {"duration": 0.6, "warmup": 0.2, "echo_clients": 20, "echo_rounds": 1, "rooms": 2,
         "fanout_start": 40.0, "fanout_factor": 2.0, "fanout_steps": 1, "fanout_refine": 0,
         "connections": 200, "redis_requests": 2000}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and short windows (the smoke test's run)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, of {','.join(SCENARIOS)}")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                        help=f"comma-separated, of {','.join(SYSTEM_NAMES)} (default: "
                             f"{','.join(DEFAULT_SYSTEMS)}; siocluster-redis-cluster: the "
                             f"chat scenario's siocluster on a Redis Cluster)")
    parser.add_argument("--generators", type=int, default=3,
                        help="load generator processes")
    parser.add_argument("--io-nodes", type=int, default=2, help="siocluster io-nodes")
    parser.add_argument("--app-nodes", type=int, default=1, help="siocluster app-nodes")
    parser.add_argument("--workers", type=int, default=32,
                        help="greenlets popping the inbox in each app-node")
    parser.add_argument("--redis-cluster-masters", type=int, default=3,
                        help="masters of siocluster-redis-cluster's Redis Cluster (no "
                             "replicas; at least 3)")
    sizes = parser.add_argument_group("sizes (defaults: full run; --quick makes them tiny)")
    sizes.add_argument("--duration", type=float, help="seconds of each measured window")
    sizes.add_argument("--warmup", type=float, help="seconds before each window")
    sizes.add_argument("--echo-clients", type=int, help="clients in the echo scenario")
    sizes.add_argument("--echo-rounds", type=int,
                       help="times each system's echo is measured (the best counts)")
    sizes.add_argument("--rooms", type=int, help="chat rooms of 10 clients (fan-out and chat)")
    sizes.add_argument("--fanout-start", type=float,
                       help="messages in per second of the first fan-out (and chat) step")
    sizes.add_argument("--fanout-factor", type=float, help="rate growth per step")
    sizes.add_argument("--fanout-steps", type=int, help="most steps up")
    sizes.add_argument("--fanout-refine", type=int,
                       help="steps between the last rate held and the first missed")
    sizes.add_argument("--npm-timeout", type=float, default=300.0,
                       help="seconds `npm ci` may take to fetch the Node baseline's packages")
    sizes.add_argument("--connections", type=int, help="idle connections to open")
    sizes.add_argument("--redis-requests", type=int, help="redis-benchmark requests per test")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"),
                        help="directory of the JSON result")
    parser.add_argument("--logs", help="keep every process's log in a directory of this one "
                                       "(default: thrown away with the run)")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.scenarios = _choices(parser, "--scenarios", args.scenarios, SCENARIOS)
    args.systems = [SYSTEM_NAMES[s] for s in
                    _choices(parser, "--systems", args.systems, tuple(SYSTEM_NAMES))]
    if args.generators < 1:
        parser.error("--generators: at least 1")
    if args.redis_cluster_masters < 3:
        parser.error("--redis-cluster-masters: at least 3 (redis-cli --cluster create's least)")
    return args


def _choices(parser, flag, value, allowed):
    chosen = [v.strip().lower() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in allowed]
    if unknown:
        parser.error(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return chosen


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def start_system(name: str, logdir: str, args):
    """A system and the redis-server of its own (None for the single process), so each
    one's Redis commands and Redis CPU are its own."""
    if name == SINGLE:
        return start_baseline(logdir), None
    redis = Redis.start(logdir, tag=name)
    try:
        if name == SIOCLUSTER:
            return start_cluster(redis, logdir, io_nodes=args.io_nodes,
                                 app_nodes=args.app_nodes, workers=args.workers), redis
        return start_baseline(logdir, processes=2, redis=redis, tag="redismanager"), redis
    except BaseException:
        redis.stop()
        raise


def run(args, logdir: str) -> dict:
    results = {"command": "python -m bench " + shlex.join(sys.argv[1:]),
               "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
               "load_average_before": list(os.getloadavg()), "settings": {
                   k: v for k, v in vars(args).items() if k not in ("out", "logs")},
               "systems": {name: {} for name in args.systems}}
    generators = Generators.start(args.generators, logdir)
    try:
        with Redis.start(logdir) as redis:
            results["machine"] = report.machine(redis.version())
            if "redis" in args.scenarios:
                say("redis-benchmark: the raw Redis ceiling")
                results["redis_ceiling"] = scenarios.redis_ceiling(redis, args.redis_requests)
        if ("echo" in args.scenarios or "fanout" in args.scenarios) and \
                any(name in ECHO_SYSTEMS for name in args.systems):
            compare(args, logdir, generators, results)
        if "chat" in args.scenarios and any(name in CHAT_SYSTEMS for name in args.systems):
            chat(args, logdir, generators, results)
        if "connections" in args.scenarios:
            for name in args.systems:
                # RedisManager's processes are the single process's
                if name in CONNECTION_SYSTEMS:
                    results["systems"][name]["connections"] = connections(
                        name, args, logdir, generators)
    finally:
        generators.stop()
    _derive(results)
    results["load_average_after"] = list(os.getloadavg())
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    results["goals"] = report.goals(results)
    return results


def compare(args, logdir: str, generators: Generators, results: dict) -> None:
    """Echo and fan-out with every system running at once, measured in turns."""
    started, targets = [], []
    try:
        for name in [n for n in args.systems if n in ECHO_SYSTEMS]:
            system, redis = start_system(name, logdir, args)
            started.append((system, redis))
            targets.append(scenarios.Target(system, redis, generators))
            results["systems"][name]["processes"] = {
                role: len(pids) for role, pids in system.pids().items()}
        if "echo" in args.scenarios:
            say(f"echo: {args.echo_clients} clients on each system, in turns")
            for name, figures in scenarios.echo(targets, args.echo_clients, args.warmup,
                                                args.duration, args.echo_rounds).items():
                results["systems"][name]["echo"] = figures
        if "fanout" in args.scenarios:
            say(f"chat fan-out: {args.rooms} rooms of 10 on each system, in turns")
            for name, figures in scenarios.fanout(
                    targets, args.rooms, args.fanout_start, args.fanout_factor,
                    args.fanout_steps, args.fanout_refine, args.warmup,
                    args.duration).items():
                results["systems"][name]["fanout"] = figures
        for system, _ in started:
            system.check()
    finally:
        for system, redis in started:
            system.stop()
            if redis is not None:
                redis.stop()


def chat(args, logdir: str, generators: Generators, results: dict) -> None:
    """The example chat on siocluster as `make run-cluster` runs it (on one redis-server,
    and on a Redis Cluster of ``--redis-cluster-masters`` masters), on python-socketio
    with RedisManager (`bench.chat_baseline`) and on Node's socket.io with the Redis adapter
    (bench/node), every system running at once and measured in turns. Node's packages are
    fetched from the npm registry first; without node or npm, or when that fails, Node is
    skipped with the reason in the results."""
    names = [n for n in args.systems if n in CHAT_SYSTEMS]
    node = None
    if NODE in names:
        say("chat: fetching the Node baseline's packages (npm ci in bench/node) unless there")
        try:
            node = node_ready(logdir, timeout=args.npm_timeout)
            results["machine"]["node"] = node_versions(node)
        except BenchError as exc:
            say(f"chat: Node socket.io skipped: {exc}")
            results["systems"][NODE]["chat"] = {"skipped": str(exc)}
            names.remove(NODE)
    if not names:
        return
    started, targets = [], []
    try:
        for name in names:
            if name == SIOCLUSTER_RC:
                say(f"chat: starting a Redis Cluster of {args.redis_cluster_masters} masters")
                redis = RedisCluster.start(logdir, masters=args.redis_cluster_masters,
                                           tag="chat")
            else:
                redis = Redis.start(logdir, tag=f"chat-{name}")
            try:
                if name == SIOCLUSTER:
                    system = start_run_cluster(redis, logdir)
                elif name == SIOCLUSTER_RC:
                    system = start_run_cluster(redis, logdir, tag="chat-rc", name=SIOCLUSTER_RC)
                    results["systems"][name]["redis_cluster"] = {
                        "masters": len(redis.ports), "replicas": 0, "ports": redis.ports,
                        "shards": _cluster_shards()}
                elif name == REDISMANAGER:
                    system = start_baseline(logdir, processes=2, redis=redis,
                                            tag="chat-redismanager",
                                            module="bench.chat_baseline")
                else:
                    system = start_node(redis, logdir, node)
            except BaseException:
                redis.stop()
                raise
            started.append((system, redis))
            targets.append(scenarios.Target(system, redis, generators))
            results["systems"][name]["chat_processes"] = {
                role: len(pids) for role, pids in system.pids().items()}
        say(f"chat: {args.rooms} rooms of 10 on each system ({', '.join(names)}), in turns")
        for name, figures in scenarios.chat(
                targets, args.rooms, args.fanout_start, args.fanout_factor, args.fanout_steps,
                args.fanout_refine, args.warmup, args.duration).items():
            results["systems"][name]["chat"] = figures
        for system, redis in started:
            system.check()
            if isinstance(redis, RedisCluster):
                redis.check()
    finally:
        for system, redis in started:
            system.stop()
            redis.stop()


def _cluster_shards() -> int:
    """The shards siocluster's nodes use on a Redis Cluster when not told (the bench does
    not tell them)."""
    from siocluster import defaults

    return defaults.CLUSTER_SHARDS


def connections(name: str, args, logdir: str, generators: Generators) -> dict:
    """One io-node (with the app-node its connects need), or one python-socketio process."""
    say(f"{name}: {args.connections} idle connections")
    redis = Redis.start(logdir, tag=f"conn-{name}") if name == SIOCLUSTER else None
    try:
        if name == SIOCLUSTER:
            # every connection comes from 127.0.0.1: the per-address cap (a defence against
            # one client host) would refuse all but its default 1,000
            system = start_cluster(redis, logdir, io_nodes=1, app_nodes=1,
                                   workers=args.workers, tag="conn", io_options=[
                                       "--max-connections-per-address",
                                       str(args.connections + 100)])
        else:
            system = start_baseline(logdir, tag="conn")
        try:
            pid = system.pids()["io-node" if name == SIOCLUSTER else "server"][0]
            return scenarios.connections(system, generators, pid, args.connections,
                                         settle=args.warmup)
        finally:
            system.stop()
    finally:
        if redis is not None:
            redis.stop()


def _derive(results: dict) -> None:
    """siocluster's rates against what Redis alone allows for its commands per message."""
    ceiling = results.get("redis_ceiling")
    ours = results["systems"].get(SIOCLUSTER, {})
    if not ceiling or not ours:
        return
    bound, measured = {}, {}
    peak = report._get(ours, "echo", "peak")
    if peak:
        bound["echo_round_trips_per_s"] = scenarios.redis_bound(
            peak["redis_per_message"]["by_command"], ceiling)
        measured["echo_round_trips_per_s"] = peak["round_trips_per_s"]
    best = report._get(ours, "fanout", "best_held")
    if best:
        bound["fanout_messages_in_per_s"] = scenarios.redis_bound(
            best["redis_per_message"]["by_command"], ceiling)
        measured["fanout_messages_in_per_s"] = best["in_per_s"]
    ceiling["bound"], ceiling["measured"] = bound, measured


def _keep(logdir: str, dest: str) -> None:
    """Copy the processes' logs of this run to ``dest``/<time>/ (the data of the
    redis-servers stays behind)."""
    import shutil

    target = os.path.join(dest, time.strftime("%Y%m%d-%H%M%S"))
    shutil.copytree(logdir, target, ignore=shutil.ignore_patterns("*-data"))
    print(f"logs: {target}", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    raise_file_limit()
    os.makedirs(args.out, exist_ok=True)
    if args.logs:
        os.makedirs(args.logs, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="siocluster-bench-") as logdir:
        try:
            results = run(args, logdir)
        except BenchError as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            return 1
        finally:
            if args.logs:
                _keep(logdir, args.logs)
    path = os.path.join(args.out, f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    m = results["machine"]
    print(f"siocluster bench: {m['cores']} cores {m['cpu_model']}, {m['memory_gib']} GiB, "
          f"Python {m['python']} ({m['python_executable']}), redis-server {m['redis_server']}")
    print(f"command: {results['command']}")
    print(f"load generator: {args.generators} processes; siocluster: {args.io_nodes} io-nodes, "
          f"{args.app_nodes} app-node(s) of {args.workers} workers")
    chat = {name: figures["chat_processes"] for name, figures in results["systems"].items()
            if "chat_processes" in figures}
    if chat:
        print("chat: " + "; ".join(_chat_line(name, p, results["systems"][name])
                                   for name, p in chat.items()))
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*results["load_average_before"])
          + ", after: {:.2f} {:.2f} {:.2f}".format(*results["load_average_after"]))
    print()
    print(report.table(results))
    text = report.redis_table(results)
    if text:
        print("\n[raw Redis ceiling: redis-benchmark, 50 clients]")
        print(text)
    print("\n[goals]")
    print(report.goals_table(results["goals"]))
    for line in report.ladder_warnings(results) + report.ties(results):
        print(f"note: {line}")
    for line in report.skipped(results):
        print(f"note: {line}")
    print(f"\nall figures: {os.path.relpath(path)}")
    return 0


def _chat_line(name: str, processes: dict, figures: dict) -> str:
    """What the chat scenario ran of one system, for the heading of the output."""
    if name not in (SIOCLUSTER, SIOCLUSTER_RC):
        return f"{name}: {processes['server']} processes"
    line = (f"{'siocluster' if name == SIOCLUSTER else name} as make run-cluster runs it "
            f"({processes['io-node']} io-nodes, {processes['app-node']} app-nodes with their "
            f"default workers, example_chat.app:app")
    rc = figures.get("redis_cluster")
    if rc:
        line += (f", on {rc['masters']} masters with {rc['replicas']} replicas, "
                 f"{rc['shards']} shards")
    return line + ")"


if __name__ == "__main__":
    sys.exit(main())
