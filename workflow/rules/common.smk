# Paths and resources, all derived from omniad.grid (the one place paths are made).

import os

from omniad.codehash import evaluate_code
from omniad.grid import (REPO, cache_dir, config_hash, data_root, enumerate_runs, feature_key,
                         features_dir, features_root, resolve_run, results_root, run_dir)

RUNS = enumerate_runs(PARAMS, PROTOCOL)
SIZE = PROTO.image_size
MANIFEST = "omniad_manifest.json"
CACHE_KEY = "cache_key.json"


def rel(path):
    """Repo-relative path when possible, so logs and DVC stay readable."""
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def run_file(name, **wc):
    """A file in a run's folder; wildcards stay wildcards."""
    return rel(run_dir(PROTOCOL, wc.get("dataset", "{dataset}"), wc.get("method", "{method}"),
                       wc.get("variant", "{variant}"), wc.get("seed", "{seed}")) / name)


def all_metrics():
    return [run_file("metrics.json", dataset=r.dataset, method=r.method, variant=r.variant,
                     seed=r.seed) for r in RUNS]


def res(kind, field):
    """Per-rule resources from params/protocols.yaml (train / prepare / light)."""
    spec = PROTO.resources.get(kind)
    return getattr(spec, field) if spec is not None else {"gpu": 0, "cpus": 1,
                                                          "mem_mb": 2000, "runtime": 30}[field]


def run_key(wc):
    return f"{PROTOCOL}/{wc.dataset}/{wc.method}/{wc.variant}/{wc.seed}"


RUN_BY_KEY = {f"{PROTOCOL}/{r.dataset}/{r.method}/{r.variant}/{r.seed}": r for r in RUNS}


def run_config(wc):
    """Hash of the run's resolved config, which includes the code training runs
    (omniad/codehash.py): as a rule param, any change to either reruns the job."""
    return config_hash(resolve_run(PARAMS, RUN_BY_KEY[run_key(wc)]))


# Feature caches: one per feature key (dataset, size, encoder and its state, precision),
# shared by every run with that key; each names one run that has it (to build it).
FEATURE_OF = {}   # run key -> features.json of its cache (absent: the run reads images)
FEATURE_RUN = {}  # feature folder name -> a run key with that feature key
for _key, _run in RUN_BY_KEY.items():
    _fk = feature_key(resolve_run(PARAMS, _run))
    if _fk is not None:
        _dir = features_dir(_fk)
        FEATURE_OF[_key] = rel(_dir / "features.json")
        FEATURE_RUN.setdefault(_dir.name, _key)


def run_inputs(wc):
    """What a training job reads: the resized images, and its feature cache if any."""
    key = run_key(wc)
    out = [rel(cache_dir(wc.dataset, SIZE) / CACHE_KEY)]
    return out + ([FEATURE_OF[key]] if key in FEATURE_OF else [])


def eval_code(wc):
    """Hash of the code evaluation runs (metrics, maps): a change re-evaluates, no retraining."""
    return evaluate_code(PARAMS.methods[wc.method].builder)
REPO_REPORTS = REPO / "reports"


rule caches:
    """The resized cache of every dataset of the protocol: the DVC data stage's target."""
    localrule: True
    input:
        [rel(cache_dir(d, SIZE) / CACHE_KEY) for d in PROTO.datasets],
