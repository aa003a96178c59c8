# Aggregate every run of the grid, render the seven tables, figures and the PDF.

import json
import os
import shutil
from pathlib import Path

#: The protocol's summary and plots under a path that names no protocol (beside results/):
#: dvc.yaml's metrics and plots, so `dvc metrics show` / `dvc exp show` read whichever
#: protocol params/protocols.yaml selects. Not git-ignored: DVC keeps metrics in git.
SUMMARY = results_root().parent / "summary"


def report_outputs():
    base = rel(REPO_REPORTS / PROTOCOL)
    tables = [f"{base}/tables/{t}.tex" for t in PARAMS.grid.table_order]
    return tables + [f"{base}/report.tex", rel(results_root() / PROTOCOL / "summary.json")]


def report_products():
    return report_outputs() + [rel(SUMMARY / "metrics.json")]


rule report:
    input:
        all_metrics(),
    output:
        report_outputs(),
    resources:
        mem_mb=res("light", "mem_mb"),
        runtime=res("light", "runtime"),
    shell:
        f"omniad report --protocol {PROTOCOL}"


rule summary:
    """Copy the protocol's summary.json and plots/ to summary/ for DVC (see SUMMARY)."""
    localrule: True
    input:
        rel(results_root() / PROTOCOL / "summary.json"),
    output:
        rel(SUMMARY / "metrics.json"),
    params:
        protocol=PROTOCOL,  # another protocol's copy is replaced even when it is newer
    run:
        plots, tmp = SUMMARY / "plots", SUMMARY / "plots.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        source = results_root() / PROTOCOL / "plots"
        if source.is_dir():
            shutil.copytree(source, tmp)
        else:
            tmp.mkdir(parents=True)
        shutil.rmtree(plots, ignore_errors=True)
        tmp.rename(plots)
        data = json.loads(Path(input[0]).read_text())
        Path(output[0] + ".tmp").write_text(json.dumps(data, indent=1) + "\n")
        os.replace(output[0] + ".tmp", output[0])
