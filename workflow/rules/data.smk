# Datasets: fetch (or generate the demo) -> check -> resized cache.

from omniad.data.fetch import trust_option


rule fetch:
    output:
        rel(data_root("{dataset}") / MANIFEST),
    wildcard_constraints:
        dataset="mvtec_ad|visa|real_iad|dtd",
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
        rel(data_root("demo") / MANIFEST),
    resources:
        mem_mb=res("prepare", "mem_mb"),
        runtime=res("prepare", "runtime"),
    shell:
        f"omniad data demo --root {rel(data_root('demo'))}"


rule check:
    input:
        rel(data_root("{dataset}") / MANIFEST),
    output:
        rel(results_root() / PROTOCOL / "checks" / "{dataset}.txt"),
    resources:
        mem_mb=res("prepare", "mem_mb"),
        runtime=res("prepare", "runtime"),
    shell:
        "omniad data check {wildcards.dataset} --root $(dirname {input}) > {output}.tmp 2>&1"
        " && mv {output}.tmp {output} || (cat {output}.tmp; rm -f {output}.tmp; exit 1)"


rule cache:
    input:
        manifest=rel(data_root("{dataset}") / MANIFEST),
        check=rel(results_root() / PROTOCOL / "checks" / "{dataset}.txt"),
    output:
        rel(cache_dir("{dataset}", SIZE) / CACHE_KEY),
    threads: res("prepare", "cpus")
    resources:
        cpus_per_task=res("prepare", "cpus"),
        mem_mb=res("prepare", "mem_mb"),
        runtime=res("prepare", "runtime"),
    shell:
        "omniad data cache {wildcards.dataset} --root $(dirname {input.manifest})"
        " --size " + str(SIZE) + " --out $(dirname {output})"
