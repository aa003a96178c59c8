"""On a real Slurm cluster: preempted training resumes exactly; a failing job fails the DAG.

Skipped unless ``sbatch`` is on PATH and the cluster answers ``sinfo``. CI runs this file from
workflow/ci/slurm-ci.sh while workflow/ci/slurm-localhost.sh has a cluster up:

* a training job requeued by Slurm mid-run (SIGTERM -> checkpoint -> exit 75 -> requeue)
  resumes at the very iteration it checkpointed and ends with the same weights and metrics as
  an uninterrupted run;
* the same through the user's command, ``snakemake --profile slurm``: the DAG finishes, Slurm
  (not a Snakemake retry) restarted the job, and the logs show where it stopped and resumed;
* a job failing on a corrupted cache file fails the DAG, the Python error is in the log
  Snakemake names, and no metrics.json is left behind.

Runs use the tiny protocol of tests/conftest.py (demo data, 64 px, shallow decoder).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, write_tiny_params

BIN = Path(sys.executable).parent
KEY = "tiny/demo/omniad/default/42"
EPOCHS = 4  # checkpoint every epoch; the job is requeued after the first one
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
        "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _controller_unreachable() -> bool:
    """slurm.conf names a controller that refuses connections (sinfo would retry for ~10 s)."""
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    try:
        text = conf.read_text()
    except OSError:
        return False
    host = re.search(r"^\s*SlurmctldHost\s*=\s*([^\s(]+)(?:\(([^)\s]+)\))?", text, re.M | re.I)
    port = re.search(r"^\s*SlurmctldPort\s*=\s*(\d+)", text, re.M | re.I)
    if host is None:
        return False
    try:
        socket.create_connection((host.group(2) or host.group(1),
                                  int(port.group(1)) if port else 6817), timeout=2).close()
    except OSError:
        return True
    return False


def _cluster_up() -> bool:
    if not shutil.which("sbatch") or _controller_unreachable():
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s.startswith(("idle", "mix", "alloc"))
                                       for s in out.stdout.split())


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _cluster_up(), reason="no Slurm cluster (workflow/ci/slurm-localhost.sh up)"),
]


def _run(*cmd: str, **kw) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)
    assert out.returncode == 0, f"{' '.join(cmd)}: {out.stdout}{out.stderr}"
    return out.stdout


def _states(jobid: str) -> list[str]:
    """Every record of a job in sacct (a requeued job has one per start), oldest first."""
    out = subprocess.run(["sacct", "-j", jobid, "--duplicates", "-X", "-n", "-P", "-o", "State"],
                         capture_output=True, text=True, timeout=60)
    return [s.split()[0] for s in out.stdout.split("\n") if s.strip()]


def _state(jobid: str) -> str:
    """Current state: squeue while Slurm holds the job, else the newest sacct record."""
    out = subprocess.run(["squeue", "-h", "-j", jobid, "-o", "%T"], capture_output=True,
                         text=True, timeout=60)
    if out.returncode == 0 and out.stdout.strip():
        return out.stdout.split()[0]
    states = _states(jobid)
    return states[-1] if states else "UNKNOWN"


def _wait(what: str, check, timeout: float, interval: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _checkpointed(run: Path, alive) -> tuple[int, int] | None:
    """(epoch, iteration) of run's checkpoint once at least one epoch is done."""
    from omniad.engine.checkpoint import load_checkpoint

    if not alive():
        pytest.fail(f"the training job ended before it could be preempted ({run})")
    try:
        state = load_checkpoint(run / "checkpoint.pt")
    except Exception:  # a checkpoint being replaced: look again
        return None
    if state is None or state["epoch"] < 1:
        return None
    return state["epoch"], state["iter"]


def _requeue(jobid: str) -> None:
    """Preempt the job as Slurm does (SIGTERM, KillWait, requeue) and let it start again now.

    Slurm keeps a requeued job pending for cred_expire + 1 s (121 s by default); setting its
    start time to now skips that wait.
    """
    _run("scontrol", "requeue", jobid)
    _wait(f"job {jobid} pending again", lambda: _state(jobid) == "PENDING", 120)
    subprocess.run(["scontrol", "update", f"JobId={jobid}", "StartTime=now"], capture_output=True,
                   timeout=60)


def _position(pattern: str, text: str, where: str) -> tuple[int, int]:
    m = re.search(pattern + r" at epoch (\d+) iteration (\d+)", text)
    assert m, f"{where} does not say {pattern!r}:\n{text[-3000:]}"
    return int(m.group(1)), int(m.group(2))


def _run_dir(env: dict[str, str]) -> Path:
    return Path(env["OMNIAD_RESULTS"]) / "tiny" / "runs" / "demo" / "omniad" / "default" / "seed42"


def _assert_same_weights(run: Path, ref: Path) -> None:
    import torch

    got = torch.load(run / "model.pt", map_location="cpu", weights_only=False)["model"]
    want = torch.load(ref / "model.pt", map_location="cpu", weights_only=False)["model"]
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"weights differ from the uninterrupted run: {differ[:10]}"
    history = [json.loads((d / "history.json").read_text())["epochs"] for d in (run, ref)]
    assert history[0] == history[1], "per-epoch losses differ from the uninterrupted run"


def _evaluate(env: dict[str, str], name: str) -> dict:
    env = {**env, "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{Path(env['OMNIAD_RESULTS']).parent / name}.db"}
    out = subprocess.run([str(BIN / "omniad"), "evaluate", KEY], env=env, capture_output=True,
                         text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return json.loads((_run_dir(env) / "metrics.json").read_text())


def _tiny_env(tiny_env: dict[str, str]) -> dict[str, str]:
    """tiny_env with EPOCHS epochs and the venv's tools on PATH (sbatch exports it all)."""
    from omniad.grid import load_params

    write_tiny_params(Path(tiny_env["OMNIAD_PARAMS"]), epochs=EPOCHS)
    load_params.cache_clear()
    return {**tiny_env, "PATH": f"{BIN}:{tiny_env['PATH']}"}


class Reference:
    """The uninterrupted run: `omniad train` locally, started at once, awaited when needed."""

    def __init__(self, root: Path, cache: Path) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env.update({
            "OMNIAD_PARAMS": str(write_tiny_params(root / "params", epochs=EPOCHS)),
            "OMNIAD_RESULTS": str(root / "results"), "OMNIAD_CACHE": str(cache),
            "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlruns.db'}", "OMP_NUM_THREADS": "1",
        })
        self.log = root / "train.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen([str(BIN / "omniad"), "train", KEY], env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT)
        self._metrics: dict | None = None

    def run_dir(self) -> Path:
        rc = self.proc.wait(timeout=1800)
        assert rc == 0, f"reference training failed: {self.log.read_text()[-2000:]}"
        return _run_dir(self.env)

    def metrics(self) -> dict:
        if self._metrics is None:
            self.run_dir()
            self._metrics = _evaluate(self.env, "reference")
        return self._metrics


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, demo_cache: Path):
    ref = Reference(tmp_path_factory.mktemp("reference"), demo_cache)
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()
        ref.proc.wait()


def _has_gpus() -> bool:
    out = subprocess.run(["sinfo", "-h", "-p", "gpu", "-o", "%G"], capture_output=True, text=True,
                         timeout=60)
    return "gpu" in out.stdout


def test_requeued_training_resumes_from_its_checkpoint(
        tiny_env: dict[str, str], tmp_path: Path, reference: Reference) -> None:
    env = _tiny_env(tiny_env)
    run = _run_dir(env)
    gpus = _has_gpus()
    out = tmp_path / "slurm.out"
    # What the profile asks for a paper training job: the gpu partition, a GPU, requeue.
    script = tmp_path / "train.sbatch"
    script.write_text("\n".join(line for line in [
        "#!/bin/bash",
        "#SBATCH --job-name=omniad-requeue-test",
        "#SBATCH --partition=gpu" if gpus else "",
        "#SBATCH --gpus=1" if gpus else "",
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --mem=3000",
        "#SBATCH --time=30",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={out}",
        'echo "[job] start ${SLURM_RESTART_COUNT:-0} gpus=${CUDA_VISIBLE_DEVICES:-none}"',
        "export OMP_NUM_THREADS=1",
        f"exec {BIN / 'omniad'} train {KEY}",
    ] if line) + "\n")
    jobid = _run("sbatch", "--parsable", str(script), env=env, cwd=tmp_path).strip().split(";")[0]
    try:
        seen = _wait("a checkpoint after epoch 1", lambda: _checkpointed(
            run, lambda: _state(jobid) not in DONE), 900)
        _requeue(jobid)
        _wait(f"job {jobid} to finish", lambda: _state(jobid) in DONE, 900, interval=1)
    finally:
        subprocess.run(["scancel", jobid], capture_output=True, timeout=60)
    text = out.read_text()
    assert _state(jobid) == "COMPLETED", f"job {jobid}: {_states(jobid)}\n{text[-3000:]}"
    states = _states(jobid)
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", states
    assert text.count("[job] start") == 2, text[-3000:]
    if gpus:
        assert "gpus=none" not in text, "a fake GPU was asked for but CUDA_VISIBLE_DEVICES is unset"
    stopped = _position(r"signal 15, checkpointed", text, "the preempted job's output")
    resumed = _position("resuming", text, "the requeued job's output")
    assert resumed == stopped, f"stopped at {stopped} but resumed at {resumed}"
    assert stopped >= seen, f"checkpoint {stopped} is older than one already seen ({seen})"
    assert not (run / "checkpoint.pt").exists(), "a finished run keeps no checkpoint"
    _assert_same_weights(run, reference.run_dir())
    got, want = _evaluate(env, "slurm"), reference.metrics()
    assert got["mean"] == want["mean"]
    assert got["per_category"] == want["per_category"]


def _dag_env(env: dict[str, str], tmp_path: Path, demo_root: Path, demo_cache: Path) -> dict:
    """A private copy of the cache and a check file older than it, so Snakemake reuses both."""
    cache = tmp_path / "cache"
    shutil.copytree(demo_cache, cache)
    env = {**env, "OMNIAD_CACHE": str(cache), "OMNIAD_DATA": str(demo_root.parent)}
    check = Path(env["OMNIAD_RESULTS"]) / "tiny" / "checks" / "demo.txt"
    check.parent.mkdir(parents=True, exist_ok=True)
    check.write_text("ok\n")
    stamp = (demo_root / "omniad_manifest.json").stat().st_mtime
    os.utime(check, (stamp, stamp))
    (cache / "demo-64" / "cache_key.json").touch()
    return env


def _snakemake(env: dict[str, str], workdir: Path, target: Path, *extra: str,
               log: Path) -> subprocess.Popen:
    """The user's command from the repo root, with the CI test profile and the tiny protocol."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [str(BIN / "snakemake"), "--cores", "all", "--profile", "slurm",
           "--profile", "workflow/ci/slurm-test", "--config", "protocol=tiny",
           "--directory", str(workdir), *extra, os.path.relpath(target, workdir)]
    with log.open("w") as fh:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)


def test_profile_training_job_is_requeued_and_resumes(
        tiny_env: dict[str, str], tmp_path: Path, demo_root: Path, demo_cache: Path,
        reference: Reference) -> None:
    env = _dag_env(_tiny_env(tiny_env), tmp_path, demo_root, demo_cache)
    run = _run_dir(env)
    log = tmp_path / "snakemake.log"
    proc = _snakemake(env, tmp_path / "work", run / "metrics.json", log=log)
    submitted = re.compile(r"submitted with SLURM jobid (\d+) \(log: (\S+)\)")

    def submission() -> tuple[str, str] | None:
        m = submitted.search(log.read_text())
        if m is None and proc.poll() is not None:
            pytest.fail(f"snakemake exited before submitting:\n{log.read_text()[-4000:]}")
        return m.groups() if m else None

    try:
        jobid, slurm_log = _wait("the train job's submission", submission, 300)
        _wait("a checkpoint after epoch 1", lambda: _checkpointed(
            run, lambda: _state(jobid) not in DONE), 900)
        _requeue(jobid)
        rc = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=120)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert len(submitted.findall(text)) == 1, "Snakemake resubmitted the job instead of Slurm requeueing it"
    states = _states(jobid)
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", states
    resumed = _position("resuming", (run / "train.log").read_text(), "train.log")
    slurm_text = Path(slurm_log).read_text() if Path(slurm_log).exists() else ""
    stopped = _position(
        r"signal 15, checkpointed", slurm_text,
        f"the Slurm log {slurm_log} (the preempted run's output: the rule's shell must outlive "
        "SIGTERM to show it, and the log must be appended to on requeue, --open-mode=append)")
    assert resumed == stopped, f"stopped at {stopped} but resumed at {resumed}"
    _assert_same_weights(run, reference.run_dir())


def test_failing_job_fails_the_dag_with_its_error_and_no_metrics(
        tiny_env: dict[str, str], tmp_path: Path, demo_root: Path, demo_cache: Path,
        reference: Reference) -> None:
    env = _dag_env(_tiny_env(tiny_env), tmp_path, demo_root, demo_cache)
    run = _run_dir(env)
    # A trained model (the reference's): the run's job reuses it (no training) and fails in
    # its evaluation, on a test split whose image files are corrupted.
    run.mkdir(parents=True)
    for name in ("model.pt", "train.json", "history.json"):
        shutil.copy2(reference.run_dir() / name, run / name)
    (run / "model.pt").touch()
    bad = sorted((Path(env["OMNIAD_CACHE"]) / "demo-64" / "test").glob("*_images.npy"))
    assert bad
    for f in bad:
        f.write_bytes(b"not a numpy file\n")
    log = tmp_path / "snakemake.log"
    # --retries 0: the profile's retries would only repeat the same failure.
    proc = _snakemake(env, tmp_path / "work", run / "metrics.json", "--retries", "0", log=log)
    rc = proc.wait(timeout=900)
    text = log.read_text()
    assert rc != 0, text[-4000:]
    assert "Error in rule run" in text, text[-4000:]
    job_log = (run / "train.log").read_text()
    assert "already trained" in job_log and ": done in " not in job_log, \
        "the trained model was not reused"
    named = re.search(r"log: (.+?) \(check log file\(s\) for error details\)", text)
    assert named, text[-4000:]
    logs = [Path(p) if os.path.isabs(p) else tmp_path / "work" / p
            for p in named.group(1).split(", ")]
    slurm_logs = [p for p in logs if "slurm_logs" in p.parts]
    assert slurm_logs, f"Snakemake names no Slurm log: {logs}"
    bodies = {p: p.read_text() for p in logs}
    for p, body in bodies.items():
        assert "ValueError: This file contains pickled" in body, f"{p} lacks the job's error:\n{body[-3000:]}"
    assert any("Traceback" in body for body in bodies.values())
    assert not (run / "metrics.json").exists(), "a failed evaluation left a metrics.json"
    jobid = re.search(r"submitted with SLURM jobid (\d+)", text).group(1)
    assert _states(jobid)[-1] == "FAILED", _states(jobid)
