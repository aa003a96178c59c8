# One job per (dataset, method, variant, seed) of the grid: train, then evaluate, in one process
# (one torch start-up per run, not two). Training is requeue-aware: on SIGTERM/SIGUSR1 it
# checkpoints and exits 75; a retry (the profile's `retries`) or a Slurm requeue resumes from
# the checkpoint (omniad/engine/train.py).
# The `config` / `code` params are hashes of the resolved run config and of the code each job
# runs: Snakemake reruns a job whose params changed, so editing params/ or a model file reruns
# exactly the runs it affects (with `dvc repro` too); a comment or docstring edit, or an edit
# of omniad/grid.py that leaves the resolved configs alone, reruns nothing (omniad/codehash.py).


def dataset_cache(wc):
    """The resized cache a feature job reads (rules.cache.output for its run's dataset)."""
    dataset = RUN_BY_KEY[FEATURE_RUN[wc.name]].dataset
    return expand(rules.cache.output[0], dataset=dataset)


rule features:
    """The frozen encoder's features of a whole training set, once per feature key."""
    input:
        dataset_cache,
    output:
        rel(features_file("{name}")),
    params:
        run=lambda wc: FEATURE_RUN[wc.name],
    threads: res("train", "cpus")
    resources:
        gpu=res("train", "gpu"),
        mem_mb=res("train", "mem_mb"),
        runtime=res("train", "runtime"),
        cpus_per_task=res("train", "cpus"),
    log:
        rel(features_file("{name}").parent.with_suffix(".log")),
    shell:
        "OMP_NUM_THREADS={threads} omniad features {params.run} > {log} 2>&1"
        " || (tail -n 40 {log}; exit 1)"


def run_inputs(wc):
    """What a training job reads: the resized images (rules.cache.output), and its feature
    cache (rules.features.output) if any."""
    out = expand(rules.cache.output[0], dataset=wc.dataset)
    name = FEATURE_OF.get(run_key(wc))
    return out + (expand(rules.features.output[0], name=name) if name else [])


rule run:
    """Train one run (resuming from its checkpoint) and evaluate its final model, in one process
    and one job: the run's model.pt is a by-product that a retry reuses (``omniad train`` skips
    a model trained under the same config hash), so a job killed during the final evaluation
    loses no training; delete model.pt to retrain under an unchanged config."""
    input:
        run_inputs,
    output:
        run_file(METRICS_FILE),
    params:
        key=run_key,
        config=run_config,  # training's config and code (and the periodic evaluations')
        code=eval_code,  # the final evaluation's code: a change re-evaluates, reusing model.pt
    threads: res("train", "cpus")
    resources:
        gpu=res("train", "gpu"),
        mem_mb=res("train", "mem_mb"),
        runtime=res("train", "runtime"),
        cpus_per_task=res("train", "cpus"),
    log:
        run_file("train.log"),
    shell:
        # bash ignores TERM/USR1 so it waits while training checkpoints and exits 75; MLflow
        # logging follows the protocol's `tracking` (omniad/engine/runner.py)
        "trap : TERM USR1; OMP_NUM_THREADS={threads} omniad train {params.key} --evaluate"
        " > {log} 2>&1 || (tail -n 40 {log}; exit 1)"


rule complexity:
    """Params and FLOPs of every ablation variant for the report (omniad/report/costs.py),
    counted once per code/params key: a job of its own, so it runs beside the training jobs
    instead of inside the report after them."""
    output:
        rel(complexity_cache_file()),
    params:
        key=complexity_key(PARAMS),  # a code or params edit that changes the counts reruns it
    resources:
        mem_mb=res("light", "mem_mb"),
        runtime=res("light", "runtime"),
    log:
        rel(complexity_cache_file().with_suffix(".log")),
    shell:
        "OMP_NUM_THREADS=1 omniad complexity --cache > {log} 2>&1 || (tail -n 40 {log}; exit 1)"


rule track:
    """Log every finished run to MLflow in one job (protocol tracking: at_end); runs already
    logged are skipped (omniad/tracking.py), so a rerun after new results logs only those."""
    localrule: True
    input:
        run_files(rules.run.output[0]),
    output:
        touch(rel(tracked_file(PROTOCOL))),
    shell:
        f"omniad track sync --protocol {PROTOCOL}"


def tracked():
    """The MLflow sync's marker when the protocol logs at the end (tracking: at_end)."""
    return rules.track.output if PROTO.tracking == "at_end" else []


rule metrics:
    """Every run of the grid trained and evaluated: the DVC train stage's target (unlike
    `--until run`, it regenerates a missing metrics.json even when the report exists)."""
    localrule: True
    input:
        run_files(rules.run.output[0]),
        rules.complexity.output,  # counted beside training (the report reads it)
        # not the MLflow sync (tracking: at_end): a target of `all`, it runs beside the report
