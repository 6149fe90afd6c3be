"""Latency histograms that merge across processes, and CPU time (and time waiting for a
CPU) read from /proc.

`Histogram` keeps counts in logarithmic buckets 2% wide, so a generator process can record
millions of latencies in a few hundred integers, ship them to the parent as JSON, and the
parent can merge them and read percentiles accurate to 2%::

    h = Histogram()
    h.add(0.0042)                        # seconds
    merged = Histogram.from_json(a).merge(Histogram.from_json(b))
    merged.percentile(99)                # seconds
"""

import math
import os
from typing import Dict, Iterable, Optional

_BASE = 1e-6          # 1 microsecond: the smallest latency told apart
_GROWTH = math.log(1.02)
LOST = -1             # the bucket of messages that never arrived: slower than anything


class Histogram:
    """Counts of latencies (seconds) in buckets 2% wide."""

    __slots__ = ("counts",)

    def __init__(self, counts: Optional[Dict[int, int]] = None):
        self.counts: Dict[int, int] = dict(counts or {})

    def add(self, seconds: float) -> None:
        index = int(math.log(max(seconds, _BASE) / _BASE) / _GROWTH)
        self.counts[index] = self.counts.get(index, 0) + 1

    def add_lost(self, count: int) -> None:
        """Count ``count`` messages that never arrived, as infinitely late."""
        if count > 0:
            self.counts[LOST] = self.counts.get(LOST, 0) + count

    def merge(self, other: "Histogram") -> "Histogram":
        for index, count in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + count
        return self

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def lost(self) -> int:
        return self.counts.get(LOST, 0)

    def percentile(self, p: float) -> float:
        """The latency below which ``p`` percent fall (``inf`` when lost messages decide)."""
        total = self.total
        if not total:
            return float("nan")
        rank = max(1, math.ceil(total * p / 100.0))
        seen = 0
        for index in sorted(i for i in self.counts if i != LOST):
            seen += self.counts[index]
            if seen >= rank:
                # the middle of the bucket
                return _BASE * math.exp((index + 0.5) * _GROWTH)
        return float("inf")

    def to_json(self) -> Dict[str, int]:
        return {str(k): v for k, v in self.counts.items()}

    @classmethod
    def from_json(cls, data: Dict[str, int]) -> "Histogram":
        return cls({int(k): int(v) for k, v in data.items()})

    @classmethod
    def merged(cls, items: Iterable[Dict[str, int]]) -> "Histogram":
        total = cls()
        for item in items:
            total.merge(cls.from_json(item))
        return total


# ---- CPU time of processes, for the generator's headroom and who used the cores ----------

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds a process has used (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # fields after the command name start at field 3 (state): utime is 14, stime 15
    return (int(fields[11]) + int(fields[12])) / _TICKS


def wait_seconds(pid: int) -> Optional[float]:
    """Seconds the threads of a process have spent runnable but waiting for a CPU, summed
    (the scheduler's run delay, ``/proc/<pid>/task/*/schedstat``): 0 when it is gone, None
    where the kernel keeps no such statistics."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    total, seen = 0, False
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[1])
            seen = True
        except (OSError, IndexError, ValueError):
            continue       # a thread that ended meanwhile, or no schedstat
    return total / 1e9 if seen else (0.0 if not tasks else None)


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (from /proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / _TICKS


def rss_kib(pid: int) -> int:
    """Resident memory of a process in KiB (VmRSS in /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}: is it still running?")
