"""Where and how a run executes (device, precision, workers) and what it records about itself."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

#: The checkout, found from this file: importing omniad.grid for it would put grid.py in the
#: code hash of every run (omniad/codehash.py), so any grid edit would retrain the grid.
REPO = Path(__file__).resolve().parents[2]


def job_cpus() -> int:
    """CPUs this job may use: OMP_NUM_THREADS (Snakemake's threads), Slurm's allocation, else
    the affinity mask. Oversubscribed torch threads are many times slower on a busy node."""
    for var in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return len(os.sched_getaffinity(0))


@dataclass
class Runtime:
    device: torch.device
    workers: int
    bf16: bool = False
    channels_last: bool = False
    config_hash: str = ""
    #: torch.compile backend for the trained modules ("inductor", "aot_eager", ...) or "".
    compile: str = ""

    @classmethod
    def create(cls, device: str | None, workers: int | str, bf16: bool, channels_last: bool,
               config_hash: str, compile: str | bool = "") -> Runtime:
        """The GPU options (bf16 autocast, channels_last, compile) pay on CUDA; they also run
        on CPU, where the tests check them for correctness."""
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.set_num_threads(job_cpus())
        n = max(job_cpus() - 1, 0) if workers == "auto" else int(workers)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        backend = "inductor" if compile is True else (compile or "")
        return cls(dev, min(n, 8), bf16, channels_last, config_hash, backend)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def compile_modules(self, model: torch.nn.Module) -> None:
        """``torch.compile`` every trained child module in place (``Module.compile``: the
        state_dict keys, hence checkpoints, are unchanged); frozen backbones stay eager,
        as they may be fed cached features."""
        if not self.compile:
            return
        from omniad.models.encoder import FrozenBackbone

        for child in model.children():
            if not isinstance(child, FrozenBackbone) and any(
                    p.requires_grad for p in child.parameters()):
                child.compile(backend=self.compile)

    def peak_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    def describe(self) -> dict[str, Any]:
        d = {"device": str(self.device), "bf16": self.bf16, "channels_last": self.channels_last,
             "compile": self.compile or False,
             "workers": self.workers, "torch_threads": torch.get_num_threads(),
             "host": platform.node(), "cpu_count": job_cpus()}
        if self.device.type == "cuda":
            d["gpu"] = torch.cuda.get_device_name(self.device)
        return d


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": dirty}


def package_versions() -> dict[str, str]:
    out = {}
    for pkg in ("omniad-bench", "torch", "torchvision", "timm", "numpy", "scipy",
                "scikit-learn", "mlflow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    out["python"] = platform.python_version()
    return out
