# Aggregate every run of the grid, render the seven tables, figures and the PDF.

from omniad.grid import dvc_summary_dir, report_table_file, report_tex_file

#: The protocol's summary and plots under a path that names no protocol (beside results/):
#: dvc.yaml's metrics and plots, so `dvc metrics show` / `dvc exp show` read whichever
#: protocol params/protocols.yaml selects. Not git-ignored: DVC keeps metrics in git.
SUMMARY = dvc_summary_dir()


def report_products():
    return [*rules.report.output, *rules.summary.output]


rule report:
    input:
        run_files(rules.run.output[0]),
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
    shell:
        # a shell job, not a `run:` block: that would start Snakemake a second time
        "omniad report --dvc-summary --protocol {params.protocol}"
