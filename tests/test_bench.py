"""`python -m bench --quick`: the benchmark still runs end to end and reports every figure.

It is a smoke test of the harness, not a performance test: the machine may be busy, so
nothing here compares timings; it checks that each scenario produced its numbers.
"""

import glob
import json
import os
import subprocess
import sys

import pytest

from bench.stats import wait_seconds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-results")
    # the Node baseline's packages come from the npm registry on the first run (npm ci)
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--generators", "2",
                           "--npm-timeout", "60", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    files = glob.glob(str(out / "bench-*.json"))
    assert len(files) == 1, files
    with open(files[0]) as f:
        return proc.stdout, json.load(f)


def test_table_has_every_section(quick_run):
    stdout, _ = quick_run
    for heading in ("[echo]", "[chat fan-out", "[idle connections", "[raw Redis ceiling",
                    "[goals]", "round trips/s (peak)", "deliveries out/s, highest step",
                    "RSS KB per connection", "vs single process", "vs RedisManager",
                    "[example chat", "deliveries/s held", "CPU us per message in: io-nodes",
                    "CPU us per message in: servers"):
        assert heading in stdout, f"{heading!r} missing from:\n{stdout}"


def test_json_has_the_command_and_the_machine(quick_run):
    _, results = quick_run
    assert results["command"].startswith("python -m bench --quick")
    machine = results["machine"]
    assert machine["cores"] > 0 and machine["memory_gib"] > 0
    assert machine["packages"]["python-socketio"] and machine["redis_server"]
    assert len(results["load_average_before"]) == 3 and len(results["load_average_after"]) == 3


def test_every_system_has_positive_figures(quick_run):
    _, results = quick_run
    systems = results["systems"]
    assert set(systems) == {"siocluster", "single process", "RedisManager", "Node socket.io"}
    for name, figures in systems.items():
        if name == "Node socket.io":      # the chat scenario's only
            assert set(figures) <= {"chat", "chat_processes"}, figures.keys()
            continue
        peak = figures["echo"]["peak"]
        assert peak["round_trips_per_s"] > 0, name
        assert 0 < peak["p50_ms"] <= peak["p99_ms"], name
        assert figures["echo"]["half_peak"]["round_trips_per_s"] > 0, name
        assert peak["window"]["cores"]["load generator"] > 0, name
        fanout = figures["fanout"]
        assert fanout["peak_out_per_s"] > 0, name
        assert fanout["steps"][0]["in_per_s"] > 0, name
        if name != "RedisManager":
            connections = figures["connections"]
            assert connections["held"] == connections["asked"] > 0, name
            assert connections["rss_per_connection_kb"] > 0, name


def test_chat_has_figures_for_every_system(quick_run):
    """siocluster (as make run-cluster) and the chat on RedisManager always; Node's
    socket.io when node, npm and the registry were there, else a reason it was skipped."""
    stdout, results = quick_run
    systems = results["systems"]
    assert systems["siocluster"]["chat_processes"] == {"io-node": 2, "app-node": 2}
    assert systems["RedisManager"]["chat_processes"] == {"server": 2}
    node = systems["Node socket.io"]["chat"]
    measured = ["siocluster", "RedisManager"]
    if "skipped" in node:
        assert node["skipped"] and f"note: Node socket.io: chat skipped: {node['skipped']}" \
            in stdout
    else:
        assert systems["Node socket.io"]["chat_processes"] == {"server": 2}
        assert results["machine"]["node"]["socket.io"].startswith("4.8.")
        measured.append("Node socket.io")
        assert "vs Node socket.io" in stdout
    kinds = {"siocluster": ("io-node", "app-node"), "RedisManager": ("server",),
             "Node socket.io": ("server",)}
    for name in measured:
        chat = systems[name]["chat"]
        assert chat["connect"]["connected"] == chat["clients"] > 0, name
        assert chat["peak_out_per_s"] > 0, name
        step = chat["steps"][0]
        assert step["in_per_s"] > 0 and step["out_per_s"] > 0, name
        assert step["acks"]["acked"] > 0 and step["acks"]["refused"] == 0, (name, step)
        cpu = step["cpu_us_per_message"]
        for kind in (*kinds[name], "redis-server", "load generator", "system"):
            assert kind in cpu, (name, cpu)
        assert cpu["system"] > 0, (name, cpu)
        # the history list (RPUSH, LTRIM) at least; RedisManager and the adapter publish
        by_command = step["redis_per_message"]["by_command"]
        assert by_command["rpush"] > 0 and by_command["ltrim"] > 0, (name, by_command)
        if name != "siocluster":
            assert by_command["publish"] > 0, (name, by_command)
        if wait_seconds(os.getpid()) is not None:
            # the scheduler's run delay of every kind of process, where the kernel keeps it
            waiting = step["window"]["waiting"]
            for kind in (*kinds[name], "redis-server", "load generator"):
                assert waiting[kind] >= 0, (name, waiting)
            assert step["window"]["waiting_total"] == pytest.approx(sum(waiting.values()),
                                                                    abs=0.01)
    assert "threads waiting for a CPU, on average" in stdout


def test_redis_figures(quick_run):
    _, results = quick_run
    for name, row in results["redis_ceiling"]["commands"].items():
        assert row["ops_per_s_p1"] > 0 and row["ops_per_s_p16"] > 0, name
    ours = results["systems"]["siocluster"]
    # every siocluster message goes through Redis; RedisManager publishes each broadcast
    assert ours["echo"]["peak"]["redis_per_message"]["total"] > 0
    assert ours["fanout"]["steps"][0]["redis_per_message"]["by_command"]["xadd"] > 0
    redismanager = results["systems"]["RedisManager"]["fanout"]["steps"][0]
    assert redismanager["redis_per_message"]["by_command"]["publish"] > 0
    assert results["redis_ceiling"]["bound"]["echo_round_trips_per_s"] > 0


def test_goals_are_reported(quick_run):
    _, results = quick_run
    goals = {g["goal"]: g for g in results["goals"]}
    assert len(goals) == 5
    # measured in every run: the echo latency and the connections
    assert goals["echo p99 ms at half the peak rate < 20"]["met"] in (True, False)
    assert goals["RSS KB per idle connection < 40"]["met"] in (True, False)
    # fan-out ratios need a rate held by both systems, which a busy machine may deny, and
    # both measured to a step they missed (the quick run's one-step ladder rarely allows)
    measured = {name: figures["fanout"]["best_held"] is not None
                and not figures["fanout"]["ladder_exhausted"]
                for name, figures in results["systems"].items() if "fanout" in figures}
    for other in ("RedisManager", "single process"):
        goal = next(g for name, g in goals.items() if name.endswith(other))
        assert (goal["met"] is None) == (not (measured["siocluster"] and measured[other])), goal
    stdout, _ = quick_run
    for name, figures in results["systems"].items():
        for label, key in (("fan-out", "fanout"), ("chat", "chat")):
            if figures.get(key, {}).get("ladder_exhausted"):
                assert f"note: {name}: {label} held every step up to the last" in stdout


def test_stepper_climbs_until_a_miss_then_refines():
    from bench.scenarios import _Stepper

    stepper = _Stepper(start=100, factor=2, max_steps=20, refine=1)
    rates = []
    while not stepper.done:
        rates.append(stepper.rate)
        stepper.record({"held": stepper.rate < 700})
    # 100..400 held, 800 missed twice (confirmed), then one step between 400 and 800
    assert rates[:6] == [100, 200, 400, 800, 800, pytest.approx(565.69, abs=0.01)]
    assert stepper.bad == 800 and stepper.good == pytest.approx(565.69, abs=0.01)

    capped = _Stepper(start=100, factor=2, max_steps=3, refine=1)
    while not capped.done:
        capped.record({"held": True})
    assert capped.bad is None and len(capped.steps) == 3     # the ladder ran out


def test_redis_cluster_system_is_chosen_by_name_only():
    """siocluster on a Redis Cluster runs only when named: the default run is unchanged."""
    from bench.__main__ import parse_args

    assert "siocluster on Redis Cluster" not in parse_args([]).systems
    args = parse_args(["--scenarios", "chat", "--systems", "siocluster,siocluster-redis-cluster"])
    assert args.systems == ["siocluster", "siocluster on Redis Cluster"]
    assert args.redis_cluster_masters == 3


def test_chat_table_shows_each_master():
    """On a Redis Cluster the chat's Redis CPU and commands per message are the masters'
    sums, each master's under them; one Redis's table has no such rows."""
    from bench import report
    from bench.scenarios import per_master

    window = {"seconds": 2.0, "cores": {"redis-server": 0.3},
              "redis_masters": {"7001": {"cores": 0.1, "calls": 300},
                                "7000": {"cores": 0.2, "calls": 100}}}
    masters = per_master(window, 1000)
    assert masters["master 1"] == {"port": 7000, "cpu_us_per_message": 400.0,
                                   "commands_per_message": 0.1, "share_of_commands": 0.25}
    assert masters["master 2"]["cpu_us_per_message"] == 200.0
    assert per_master({"seconds": 2.0, "cores": {}}, 1000) is None

    step = {"in_per_s": 10.0, "out_per_s": 100.0, "held": True,
            "cpu_us_per_message": {"redis-server": 600.0},
            "redis_per_message": {"total": 0.4}, "redis_per_master": masters}
    results = {"systems": {"siocluster on Redis Cluster": {"chat": {
        "best_held": step, "steps": [step], "peak_out_per_s": 100.0}}}}
    text = report.table(results)
    for line in ("CPU us per message in: redis-server", "redis-server master 1 of 2",
                 "redis-server master 2 of 2", "on master 1 of 2"):
        assert line in text, text
    del step["redis_per_master"]
    assert "master 1" not in report.table(results)


def test_a_step_held_by_both_is_called_a_tie():
    """When a baseline's highest step held is siocluster's own, the output says their ratio
    is within the ladder's resolution; a step apart, it says nothing."""
    from bench import report

    def system(rate):
        return {"chat": {"best_held": {"target_in_per_s": rate, "out_per_s": rate * 10}}}

    results = {"systems": {"siocluster": system(3139.4), "Node socket.io": system(3139.4),
                           "RedisManager": system(930.0)}}
    assert report.ties(results) == [
        "siocluster and Node socket.io held the same chat step (3,139.4 messages in/s): the "
        "ratio between them is within the ladder's resolution (--fanout-refine tells them "
        "apart finer)"]
    results["systems"]["Node socket.io"] = system(2836.6)
    assert report.ties(results) == []


def test_wait_seconds_reads_how_long_threads_waited_for_a_cpu():
    """More busy processes than cores: the scheduler keeps each waiting part of the time,
    and `wait_seconds` reads it; a process that is gone waited for nothing."""
    if wait_seconds(os.getpid()) is None:
        pytest.skip("this kernel keeps no scheduler statistics (schedstat)")
    spin = ("import time\nend = time.process_time() + 0.4\n"
            "while time.process_time() < end: pass\nprint('spun', flush=True)\ninput()")
    busy = [subprocess.Popen([sys.executable, "-c", spin], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
            for _ in range(2 * (os.cpu_count() or 1) + 1)]
    try:
        # each has used its 0.4 s of CPU once it says so; then it waits on its stdin
        assert [proc.stdout.readline() for proc in busy] == ["spun\n"] * len(busy)
        waited = [wait_seconds(proc.pid) for proc in busy]
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    assert all(w >= 0 for w in waited), waited
    assert sum(waited) > 0, waited
    assert wait_seconds(1 << 23) == 0.0       # above any pid_max: no such process
