# omniad-bench DAG: fetch -> check -> cache -> train -> evaluate -> aggregate/report.
#   snakemake --cores all                           # the demo protocol, on a laptop
#   snakemake -n --config protocol=paper            # list the whole paper grid
#   snakemake --cores all --profile slurm           # the paper grid on a Slurm cluster
# The grid comes from params/ through omniad.grid; nothing here spells an experiment.

from omniad.grid import load_params

PARAMS = load_params()
PROTOCOL = config.get("protocol", PARAMS.default_protocol)
PROTO = PARAMS.protocol(PROTOCOL)


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/report.smk"


onstart:
    # what the grid will cost, from measured images/s (omniad/gridcost.py), before launch
    from argparse import Namespace
    from omniad.gridcost import cli as grid_cost

    grid_cost(Namespace(protocol=PROTOCOL, throughput=None, images_per_s=None, summary=True))
    if PROTO.tracking == "each_run":  # at_end: the track rule creates the store
        shell(f"omniad track init --protocol {PROTOCOL}")


rule all:
    default_target: True
    input:
        report_products(),
        tracked(),
