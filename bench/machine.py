"""The machine a benchmark ran on, as the benchmarks report it."""
import os
import platform


def cpu_name():
    """The CPU model from /proc/cpuinfo (else what platform knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine():
    """`<CPU model>, <N> cores, <OS>`."""
    return f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()}"
