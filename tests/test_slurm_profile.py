"""slurm/config.yaml against the workflow: every rule it configures exists, and the rule that
trains is the one sent to the GPU partition with requeue and an early TERM (a renamed rule
would otherwise silently fall back to the CPU partition without requeue)."""

from __future__ import annotations

import re

import yaml
from conftest import REPO


def rules() -> dict[str, str]:
    """Rule name -> its body, from the Snakefile and workflow/rules/*.smk."""
    text = "\n".join(p.read_text() for p in [REPO / "Snakefile",
                                             *sorted((REPO / "workflow" / "rules").glob("*.smk"))])
    blocks = re.split(r"^rule (\w+):\n", text, flags=re.M)
    return dict(zip(blocks[1::2], blocks[2::2], strict=True))


def test_profile_configures_only_rules_of_the_workflow() -> None:
    profile = yaml.safe_load((REPO / "slurm" / "config.yaml").read_text())
    assert set(profile["set-resources"]) <= set(rules()), set(profile["set-resources"]) - set(rules())


def test_the_training_rule_is_requeued_on_the_gpu_partition() -> None:
    trains = [name for name, body in rules().items() if "omniad train " in body]
    assert trains == ["run"], trains
    settings = yaml.safe_load((REPO / "slurm" / "config.yaml").read_text())["set-resources"]["run"]
    assert settings["slurm_partition"] == "gpu"
    assert "--requeue" in settings["slurm_extra"] and "--signal=TERM@" in settings["slurm_extra"]
