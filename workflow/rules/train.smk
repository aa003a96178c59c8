# One training job and one evaluation job per (dataset, method, variant, seed) of the grid.
# Training is requeue-aware: on SIGTERM/SIGUSR1 it checkpoints and exits 75; a retry (the
# profile's `retries`) or a Slurm requeue resumes from the checkpoint (omniad/engine/train.py).
# The `config` / `code` params are hashes of the resolved run config and of the code each job
# runs: Snakemake reruns a job whose params changed, so editing params/ or a model file reruns
# exactly the runs it affects (with `dvc repro` too).


rule features:
    """The frozen encoder's features of a whole training set, once per feature key."""
    input:
        lambda wc: rel(cache_dir(RUN_BY_KEY[FEATURE_RUN[wc.name]].dataset, SIZE) / CACHE_KEY),
    output:
        rel(features_root() / "{name}" / "features.json"),
    params:
        run=lambda wc: FEATURE_RUN[wc.name],
    threads: res("train", "cpus")
    resources:
        gpu=res("train", "gpu"),
        mem_mb=res("train", "mem_mb"),
        runtime=res("train", "runtime"),
        cpus_per_task=res("train", "cpus"),
    log:
        rel(features_root() / "{name}.log"),
    shell:
        "OMP_NUM_THREADS={threads} omniad features {params.run} > {log} 2>&1"
        " || (tail -n 40 {log}; exit 1)"


rule train:
    input:
        run_inputs,
    output:
        run_file("model.pt"),
    params:
        key=run_key,
        config=run_config,
    threads: res("train", "cpus")
    resources:
        gpu=res("train", "gpu"),
        mem_mb=res("train", "mem_mb"),
        runtime=res("train", "runtime"),
        cpus_per_task=res("train", "cpus"),
    log:
        run_file("train.log"),
    shell:
        # bash ignores TERM/USR1 so it waits while training checkpoints and exits 75
        "trap : TERM USR1; OMP_NUM_THREADS={threads} omniad train {params.key} > {log} 2>&1"
        " || (tail -n 40 {log}; exit 1)"


rule evaluate:
    input:
        run_file("model.pt"),
    output:
        run_file("metrics.json"),
    params:
        key=run_key,
        config=run_config,
        code=eval_code,
    threads: res("train", "cpus")
    resources:
        gpu=res("train", "gpu"),
        mem_mb=res("train", "mem_mb"),
        runtime=res("train", "runtime"),
        cpus_per_task=res("train", "cpus"),
    log:
        run_file("evaluate.log"),
    shell:
        "OMP_NUM_THREADS={threads} omniad evaluate {params.key}"
        + (" --no-track" if PROTO.tracking == "at_end" else "")
        + " > {log} 2>&1 || (tail -n 40 {log}; exit 1)"


def tracked():
    """The MLflow sync's marker when the protocol logs at the end (tracking: at_end)."""
    return [rel(results_root() / PROTOCOL / "mlflow-synced")] if PROTO.tracking == "at_end" else []


rule track:
    """Log every finished run to MLflow in one job (protocol tracking: at_end); runs already
    logged are skipped (omniad/tracking.py), so a rerun after new results logs only those."""
    localrule: True
    input:
        all_metrics(),
    output:
        touch(rel(results_root() / PROTOCOL / "mlflow-synced")),
    shell:
        f"omniad track sync --protocol {PROTOCOL}"


rule metrics:
    """Every run of the grid trained and evaluated: the DVC train stage's target (unlike
    `--until evaluate`, it regenerates a missing metrics.json even when the report exists)."""
    localrule: True
    input:
        all_metrics(),
        tracked(),
