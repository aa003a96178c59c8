# Datasets: fetch (or generate the demo) -> check -> resized cache.

from omniad.data.fetch import trust_option
from omniad.grid import fetched_datasets


rule fetch:
    output:
        rel(manifest_file("{dataset}")),
    wildcard_constraints:
        dataset="|".join(fetched_datasets(PARAMS)),  # params/datasets.yaml, less the generated
    params:
        # only for archives with neither a pinned hash nor a lock entry (Real-IAD's first
        # fetch); the lock written then (params/checksums/) verifies every later fetch
        trust=lambda wc: trust_option(wc.dataset),
    resources:
        mem_mb=res("prepare", "mem_mb"),
        runtime=res("prepare", "runtime"),
    shell:
        "omniad data fetch {wildcards.dataset} --root $(dirname {output}) -q {params.trust}"


rule demo_data:
    output:
        rel(manifest_file("demo")),
    resources:
        mem_mb=res("prepare", "mem_mb"),
        runtime=res("prepare", "runtime"),
    shell:
        f"omniad data demo --root {rel(manifest_file('demo').parent)}"


rule check:
    input:
        rules.fetch.output,  # or demo_data's: the same file pattern, made for "demo"
    output:
        rel(check_file(PROTOCOL, "{dataset}")),
    resources:
        mem_mb=res("prepare", "mem_mb"),
        runtime=res("prepare", "runtime"),
    shell:
        "omniad data check {wildcards.dataset} --root $(dirname {input}) > {output}.tmp 2>&1"
        " && mv {output}.tmp {output} || (cat {output}.tmp; rm -f {output}.tmp; exit 1)"


rule cache:
    input:
        manifest=rules.fetch.output[0],
        check=rules.check.output[0],
    output:
        rel(cache_key_file("{dataset}", SIZE)),
    threads: res("prepare", "cpus")
    resources:
        cpus_per_task=res("prepare", "cpus"),
        mem_mb=res("prepare", "mem_mb"),
        runtime=res("prepare", "runtime"),
    shell:
        "omniad data cache {wildcards.dataset} --root $(dirname {input.manifest})"
        " --size " + str(SIZE) + " --out $(dirname {output})"


rule caches:
    """The resized cache of every dataset of the protocol: the DVC data stage's target."""
    localrule: True
    input:
        expand(rules.cache.output[0], dataset=PROTO.datasets),
