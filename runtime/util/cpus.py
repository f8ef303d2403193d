"""The number of CPU cores this process may use: the one count every part of the project uses."""

import os
import threading
import time


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def counters() -> tuple[int, int]:
    """(all jiffies, idle + iowait jiffies) of the whole machine since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    return sum(values), values[3] + values[4]


def busy_cores(interval: float = 0.3) -> float | None:
    """Cores that other work keeps busy, from the kernel's CPU counters over ``interval``
    seconds (Linux /proc/stat; this process should be idle meanwhile). None where unknown."""
    try:
        total0, idle0 = counters()
        time.sleep(interval)
        total1, idle1 = counters()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


class OtherLoad:
    """Cores that other processes keep busy, measured while this one works: the machine's
    busy time (/proc/stat) less this process's own CPU time, over the last ``period``
    seconds or more. Reading it costs two small reads at most once per period, and never
    sleeps. 0 until a first period has passed, and where the counters cannot be read."""

    def __init__(self, period: float = 1.0):
        self.period = period
        self._lock = threading.Lock()
        self._last: tuple[float, int, int, float] | None = None
        self._value = 0.0

    def cores(self) -> float:
        now = time.monotonic()
        with self._lock:
            if self._last is not None and now - self._last[0] < self.period:
                return self._value
            try:
                total, idle = counters()
            except (OSError, ValueError, IndexError):
                return self._value
            own = time.process_time()  # every thread of this process, ONNX Runtime's too
            if self._last is not None:
                t0, total0, idle0, own0 = self._last
                if total > total0:
                    busy = (1.0 - (idle - idle0) / (total - total0)) * (os.cpu_count() or 1)
                    self._value = max(0.0, busy - (own - own0) / (now - t0))
            self._last = (now, total, idle, own)
            return self._value
