"""summary/: the selected protocol's summary.json and plots under a path that names no
protocol (dvc.yaml's metrics and plots), so `dvc metrics show` and `dvc exp show` read whichever
protocol params/protocols.yaml selects. A shell job of its own (``omniad report --dvc-summary``):
as a Snakemake ``run:`` block it cost a second Snakemake start (~15 s) at the end of the DAG.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from omniad.atomic import install_tree, remove_stale, tmp_sibling, write_bytes_atomic
from omniad.grid import METRICS_FILE, dvc_summary_dir, load_params, summary_file


def copy_summary(protocol: str, dest: Path | None = None) -> Path:
    """Copy ``results/<protocol>/summary.json`` (and its plots/) into ``dest`` (summary/);
    the plots are swapped in whole (``omniad.atomic.install_tree``) and the JSON replaced
    atomically. Returns the JSON's path."""
    dest = Path(dest) if dest is not None else dvc_summary_dir()
    source = summary_file(protocol)
    try:
        text = source.read_text()
        json.loads(text)  # a broken summary is not copied
    except FileNotFoundError:
        raise FileNotFoundError(f"{source}: no summary; run `omniad report --protocol "
                                f"{protocol}` first") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not valid JSON ({exc})") from None
    plots = dest / "plots"
    remove_stale(plots)  # a copy an interrupted job left beside it
    tmp = tmp_sibling(plots)
    if (source.parent / "plots").is_dir():
        shutil.copytree(source.parent / "plots", tmp)
    else:
        tmp.mkdir(parents=True)
    install_tree(tmp, plots)
    return write_bytes_atomic(dest / METRICS_FILE, text)


def cli(protocol: str | None) -> int:
    protocol = protocol or load_params().default_protocol
    try:
        copy_summary(protocol)
    except (OSError, ValueError) as exc:
        print(f"omniad report --dvc-summary: error: {exc}", file=sys.stderr)
        return 1
    return 0
