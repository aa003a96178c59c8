# Aggregate every run of the grid, render the seven tables, figures and the PDF.

import json
import os
import shutil
from pathlib import Path

from omniad.grid import dvc_summary_dir, report_table_file, report_tex_file

#: The protocol's summary and plots under a path that names no protocol (beside results/):
#: dvc.yaml's metrics and plots, so `dvc metrics show` / `dvc exp show` read whichever
#: protocol params/protocols.yaml selects. Not git-ignored: DVC keeps metrics in git.
SUMMARY = dvc_summary_dir()


def report_products():
    return [*rules.report.output, *rules.summary.output]


rule report:
    input:
        run_files(rules.evaluate.output[0]),
        rules.complexity.output,
    output:
        *[rel(report_table_file(PROTOCOL, t)) for t in PARAMS.grid.table_order],
        rel(report_tex_file(PROTOCOL)),
        summary=rel(summary_file(PROTOCOL)),
    resources:
        mem_mb=res("light", "mem_mb"),
        runtime=res("light", "runtime"),
    shell:
        f"omniad report --protocol {PROTOCOL}"


rule summary:
    """Copy the protocol's summary.json and plots/ to summary/ for DVC (see SUMMARY)."""
    localrule: True
    input:
        rules.report.output.summary,
    output:
        rel(SUMMARY / METRICS_FILE),
    params:
        protocol=PROTOCOL,  # another protocol's copy is replaced even when it is newer
    run:
        plots, tmp = SUMMARY / "plots", SUMMARY / "plots.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        source = summary_file(PROTOCOL).parent / "plots"
        if source.is_dir():
            shutil.copytree(source, tmp)
        else:
            tmp.mkdir(parents=True)
        shutil.rmtree(plots, ignore_errors=True)
        tmp.rename(plots)
        data = json.loads(Path(input[0]).read_text())
        Path(output[0] + ".tmp").write_text(json.dumps(data, indent=1) + "\n")
        os.replace(output[0] + ".tmp", output[0])
