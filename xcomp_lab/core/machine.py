"""The machine a measurement ran on, described the same way by every tool that records one."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

from xcomp_lab.core.units import GIB


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    """This machine's RAM in GiB (Linux), else None."""
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    kib = int(re.search(r"MemTotal:\s+(\d+) kB", meminfo.read_text()).group(1))
    return round(kib * 1024 / GIB, 1)


def _git(cwd: Path, *args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def gpu_environment() -> dict[str, Any]:
    """Every visible GPU (name, total memory) and the library versions that matter on a GPU run."""
    import transformers

    gpus = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    return {"gpu": gpus[0].name if gpus else None,
            "total_memory_bytes": gpus[0].total_memory if gpus else None,
            "gpus": [{"name": p.name, "total_memory_bytes": p.total_memory} for p in gpus],
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__}


def describe_machine(repository: Path | None = None) -> dict[str, Any]:
    """This machine as timings need it named: CPU, cores, memory, load, threads and, in a checkout, the commit."""
    status = _git(repository, "status", "--porcelain", "--untracked-files=no") if repository else None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_1_5_15_min_at_recording": [round(x, 2) for x in os.getloadavg()],
        "commit": _git(repository, "rev-parse", "HEAD") if repository else None,
        "uncommitted_changes": None if status is None else bool(status),
    }
