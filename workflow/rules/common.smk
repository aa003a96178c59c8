# Paths, keys, file names, resources: all from omniad.grid (the one place they are made);
# nothing here spells a path, a file name, a resource default or a dataset.

import os

from omniad.codehash import evaluate_code
from omniad.grid import (METRICS_FILE, cache_key_file, check_file, config_hash,
                         enumerate_runs, feature_key, features_file, manifest_file,
                         resolve_run, resources, run_dir, run_key as make_run_key, summary_file,
                         tracked_file)
from omniad.report.costs import cache_file as complexity_cache_file, cache_key as complexity_key

RUNS = enumerate_runs(PARAMS, PROTOCOL)
SIZE = PROTO.image_size


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


def run_files(pattern):
    """A rule's output pattern (``rules.X.output``) filled in for every run of the grid."""
    return expand(pattern, zip, dataset=[r.dataset for r in RUNS],
                  method=[r.method for r in RUNS], variant=[r.variant for r in RUNS],
                  seed=[r.seed for r in RUNS])


def res(kind, field):
    """Per-rule resources from params/protocols.yaml (train / prepare / light)."""
    return getattr(resources(PROTO, kind), field)


def run_key(wc):
    return make_run_key(PROTOCOL, wc.dataset, wc.method, wc.variant, wc.seed)


RUN_BY_KEY = {r.key: r for r in RUNS}


def run_config(wc):
    """Hash of the run's resolved config, which includes the code training runs
    (omniad/codehash.py): as a rule param, any change to either reruns the job."""
    return config_hash(resolve_run(PARAMS, RUN_BY_KEY[run_key(wc)]))


# Feature caches: one per feature key (dataset, size, encoder and its state, precision),
# shared by every run with that key; each names one run that has it (to build it).
FEATURE_OF = {}   # run key -> feature folder name (absent: the run reads images)
FEATURE_RUN = {}  # feature folder name -> a run key with that feature key
for _key, _run in RUN_BY_KEY.items():
    _fk = feature_key(resolve_run(PARAMS, _run))
    if _fk is not None:
        _name = features_file(_fk).parent.name
        FEATURE_OF[_key] = _name
        FEATURE_RUN.setdefault(_name, _key)


def eval_code(wc):
    """Hash of the code evaluation runs (metrics, maps): a change re-evaluates, no retraining."""
    return evaluate_code(PARAMS.methods[wc.method].builder)

