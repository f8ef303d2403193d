"""The number of CPU cores this process may use: the one count every part of the project uses."""

import os


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def busy_cores(interval: float = 0.3) -> float | None:
    """Cores that other work keeps busy, from the kernel's CPU counters over ``interval``
    seconds (Linux /proc/stat; this process should be idle meanwhile). None where unknown."""
    import time

    def counters() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]
        return sum(values), values[3] + values[4]  # all jiffies, idle + iowait

    try:
        total0, idle0 = counters()
        time.sleep(interval)
        total1, idle1 = counters()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)
