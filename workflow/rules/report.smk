# Aggregate every run of the grid, render the seven tables, figures and the PDF.


def report_products():
    base = rel(REPO_REPORTS / PROTOCOL)
    tables = [f"{base}/tables/{t}.tex" for t in PARAMS.grid.table_order]
    return tables + [f"{base}/report.tex", rel(results_root() / PROTOCOL / "summary.json")]


rule report:
    input:
        all_metrics(),
    output:
        report_products(),
    resources:
        mem_mb=res("light", "mem_mb"),
        runtime=res("light", "runtime"),
    shell:
        f"omniad report --protocol {PROTOCOL}"
