"""Shared fixtures: a tiny protocol over the demo set, isolated from the repo's results."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
TINY_SIZE = 64


def write_tiny_params(dest: Path, epochs: int = 3, size: int = TINY_SIZE, evaluate_every: int = 1,
                      **model) -> Path:
    """A copy of params/ with a 'tiny' protocol: demo data, small images, shallow decoder,
    a periodic evaluation after every epoch but the last (the final one is `omniad evaluate`)."""
    shutil.copytree(REPO / "params", dest, dirs_exist_ok=True)
    protos = yaml.safe_load((dest / "protocols.yaml").read_text())
    protos["protocols"]["tiny"] = {
        "datasets": ["demo"], "ablation_dataset": "demo", "image_size": size,
        "epochs": {"demo": epochs}, "batch_size": 8, "seeds": [42], "pretrained": False,
        "checkpoint_every": 1, "eval_batch_size": 16, "workers": 0,
        "evaluate_every": evaluate_every,
    }
    (dest / "protocols.yaml").write_text(yaml.safe_dump(protos, sort_keys=False))
    omni = yaml.safe_load((dest / "methods/omniad.yaml").read_text())
    omni.setdefault("protocol_overrides", {})["tiny"] = {"depths": [1, 1, 1, 1], **model}
    (dest / "methods/omniad.yaml").write_text(yaml.safe_dump(omni, sort_keys=False))
    return dest


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from omniad.data.demo import make_demo

    root = tmp_path_factory.mktemp("data") / "demo"
    make_demo(root)
    return root


@pytest.fixture(scope="session")
def demo_cache(demo_root: Path) -> Path:
    from omniad.data.cache import build_cache

    cache = demo_root.parent.parent / "cache"
    build_cache("demo", demo_root, TINY_SIZE, cache / f"demo-{TINY_SIZE}", log=lambda *_: None)
    return cache


@pytest.fixture
def tiny_env(tmp_path: Path, demo_cache: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment (also for subprocesses) pointing omniad at tiny params and tmp results."""
    from omniad.grid import load_params

    env = {
        "OMNIAD_PARAMS": str(write_tiny_params(tmp_path / "params")),
        "OMNIAD_RESULTS": str(tmp_path / "results"),
        "OMNIAD_CACHE": str(demo_cache),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    load_params.cache_clear()
    yield {**os.environ, **env}
    load_params.cache_clear()
