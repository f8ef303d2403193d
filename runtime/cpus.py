"""The number of CPU cores this process may use: the one count every part of the project uses."""

import os


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
