#!/usr/bin/env bash
# CI stage (after `make test`): the demo DAG through a real Slurm cluster with the user's own
# command, `snakemake --cores all --profile slurm`, then the preemption/failure tests.
#
#   1. workflow/ci/slurm-localhost.sh up (torn down on exit, whatever happens);
#   2. a subset of the demo DAG: Table VI's Omni-AD with depths 2-2-2-2 (the cheapest run of the
#      grid; any run exercises the same rules and profile), with its data/cache jobs, run from the repo root with `--profile slurm` (the literal user
#      profile; workflow/ci/slurm-test only speeds up status checks) and `--config protocol=demo`,
#      everything written to a temp folder (OMNIAD_* / MLFLOW_TRACKING_URI, --directory);
#   3. sacct must show every job of that run COMPLETED under Slurm;
#   4. metrics.json (mean, per_category) must equal the local demo DAG's (results/demo from
#      `make test`; when missing, the same targets are run locally first);
#   5. tests/test_slurm.py: a training job requeued mid-run resumes from its checkpoint to the
#      same weights; a failing job fails the DAG with its own error and no metrics.json.
# Exits non-zero if anything fails. SLURM_CI_KEEP=1 keeps the temp folder.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
BIN=$REPO/.venv/bin
export PATH=$BIN:$PATH PYTHONUNBUFFERED=1
VARIANTS=(depths-2-2-2-2)  # the cheapest Omni-AD run of the grid (Table VI)
PROTOCOL=demo

log() { echo "[slurm-ci] $*"; }
fail() { echo "[slurm-ci] FAILED: $*" >&2; exit 1; }

[[ -x $BIN/snakemake ]] || fail "$BIN/snakemake missing; run \`make venv\` first"
# the Snakemake executor plugin for Slurm: pyproject.toml's `slurm` extra, not in the default venv
"$BIN/python" -c "import snakemake_executor_plugin_slurm" 2>/dev/null \
  || make --no-print-directory venv EXTRAS=pipeline,dev,slurm
TMP=$(mktemp -d "${TMPDIR:-/tmp}/omniad-slurm-ci.XXXXXX")
chmod 755 "$TMP"
T_START=$SECONDS

cleanup() {
  local rc=$?
  set +e
  log "tearing the cluster down"
  workflow/ci/slurm-localhost.sh down
  if ((rc == 0)) && [[ -z ${SLURM_CI_KEEP:-} ]]; then rm -rf "$TMP"; else log "kept $TMP"; fi
  log "total $((SECONDS - T_START)) s, exit $rc"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

t=$SECONDS
workflow/ci/slurm-localhost.sh up
T_UP=$((SECONDS - t))

# Everything this stage writes goes under $TMP (the repo's results/, cache/, data/, reports/
# and mlruns.db belong to the local demo DAG).
export OMNIAD_RESULTS=$TMP/results OMNIAD_CACHE=$TMP/cache OMNIAD_DATA=$TMP/data \
  OMNIAD_REPORTS=$TMP/reports MLFLOW_TRACKING_URI=sqlite:///$TMP/mlruns.db
mkdir -p "$TMP/work"

# Target files exactly as the rules spell them: relative to snakemake's working directory.
targets() {  # targets WORKDIR RESULTS
  (cd "$1" && OMNIAD_RESULTS=$2 "$BIN/python" - "$PROTOCOL" "${VARIANTS[@]}" <<'EOF'
import os
import sys

from omniad.grid import METRICS_FILE, load_params, run_dir

protocol, *variants = sys.argv[1:]
method = load_params().grid.ablation_method
for v in variants:
    print(os.path.relpath(run_dir(protocol, "demo", method, v, 42) / METRICS_FILE))
EOF
  )
}
mapfile -t TARGETS < <(targets "$TMP/work" "$OMNIAD_RESULTS")

log "demo DAG subset through Slurm: ${TARGETS[*]}"
t=$SECONDS
set +e
# The user's command (`--cores all --profile slurm`, from the repo root) plus CI's additions.
snakemake --cores all --profile slurm --profile workflow/ci/slurm-test --config protocol=$PROTOCOL \
  --directory "$TMP/work" "${TARGETS[@]}" 2>&1 | tee "$TMP/snakemake-slurm.log"
rc=${PIPESTATUS[0]}
set -e
T_DAG=$((SECONDS - t))
((rc == 0)) || fail "snakemake --profile slurm exited $rc (log: $TMP/snakemake-slurm.log)"
for f in "${TARGETS[@]}"; do [[ -s $TMP/work/$f ]] || fail "$f missing after the Slurm run"; done

RUN_ID=$(sed -n 's/.*SLURM run ID: \([0-9a-f-]*\).*/\1/p' "$TMP/snakemake-slurm.log" | head -n 1)
[[ -n $RUN_ID ]] || fail "no 'SLURM run ID' in the snakemake log"
log "sacct of SLURM run $RUN_ID:"
FMT=JobID,JobName%36,Partition,Account,AllocCPUS,ReqMem,Timelimit,Elapsed,State,ExitCode,Comment%80
sacct -X --name "$RUN_ID" --starttime now-1days -o "$FMT" | tee "$TMP/sacct.txt"
sacct -X -n -P --name "$RUN_ID" --starttime now-1days -o JobID,State,Comment >"$TMP/sacct.psv"
"$BIN/python" - "$TMP/sacct.psv" "${#VARIANTS[@]}" <<'EOF'
import collections
import sys

rows = [line.split("|", 2) for line in open(sys.argv[1]).read().splitlines() if line]
n = int(sys.argv[2])
bad = [r for r in rows if r[1] != "COMPLETED"]
rules = collections.Counter(r[2].split("_wildcards_")[0].removeprefix("rule_") for r in rows)
want = {"demo_data": 1, "check": 1, "cache": 1, "run": n}
print(f"[slurm-ci] sacct: {len(rows)} jobs, per rule {dict(rules)}")
if bad:
    sys.exit(f"[slurm-ci] FAILED: jobs not COMPLETED in sacct: {bad}")
for rule, count in want.items():
    if rules[rule] != count:
        sys.exit(f"[slurm-ci] FAILED: sacct has {rules[rule]} {rule} jobs, expected {count}")
EOF
train_job=$(grep '|rule_run_' "$TMP/sacct.psv" | head -n 1 | cut -d'|' -f1)
log "sacct record of train job $train_job (all fields of interest, steps included):"
sacct -j "$train_job" -o JobID,JobName%36,Partition,Account,User,NodeList,AllocCPUS,AllocTRES%50,ReqMem,MaxRSS,Timelimit,Start,End,Elapsed,State,ExitCode \
  | tee "$TMP/sacct-train.txt"

# The same runs of the local demo DAG (make test leaves them in results/demo).
REF=$REPO/results
missing=0
mapfile -t REF_FILES < <(targets "$REPO" "$REF")
for f in "${REF_FILES[@]}"; do
  [[ -s $REPO/$f ]] || missing=1
done
if ((missing)); then
  log "no local demo results in $REF; running the same targets locally (no Slurm)"
  REF=$TMP/local-results
  mkdir -p "$TMP/local"
  mapfile -t LOCAL_TARGETS < <(targets "$TMP/local" "$REF")
  OMNIAD_RESULTS=$REF MLFLOW_TRACKING_URI=sqlite:///$TMP/local-mlruns.db \
    snakemake --cores all --config protocol=$PROTOCOL --directory "$TMP/local" "${LOCAL_TARGETS[@]}" \
    >"$TMP/snakemake-local.log" 2>&1 || { tail -n 40 "$TMP/snakemake-local.log"; fail "local reference run"; }
fi
"$BIN/python" - "$OMNIAD_RESULTS" "$REF" "$PROTOCOL" "${VARIANTS[@]}" <<'EOF'
import json
import sys
from pathlib import Path

from omniad.grid import METRICS_FILE, load_params, run_dir

slurm, local, protocol, *variants = sys.argv[1:]
method = load_params().grid.ablation_method
bad = 0
for v in variants:
    a, b = (json.loads((run_dir(protocol, "demo", method, v, 42, Path(root)) / METRICS_FILE)
                       .read_text()) for root in (slurm, local))
    for key in ("mean", "per_category"):
        if a[key] != b[key]:
            bad += 1
            print(f"[slurm-ci] {v}: {key} differs\n  slurm: {a[key]}\n  local: {b[key]}")
    print(f"[slurm-ci] {v}: Slurm mAD {a['mean']['mad']:.6f}, local {b['mean']['mad']:.6f}")
if bad:
    sys.exit(f"[slurm-ci] FAILED: {bad} metrics differ between the Slurm and the local run")
print("[slurm-ci] metrics equal (mean and per_category) to the local demo DAG's")
EOF

log "preemption and failure tests"
t=$SECONDS
"$BIN/pytest" -q -p no:cacheprovider -rs tests/test_slurm.py
T_TEST=$((SECONDS - t))
log "timings: cluster up ${T_UP} s, Slurm DAG subset ${T_DAG} s, tests/test_slurm.py ${T_TEST} s"
