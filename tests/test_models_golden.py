"""Refactors of omniad/models change no number: every implemented method equals its pinned
fingerprint exactly (state_dict keys and sums, losses before and after one step, maps, scores).

The pins (tests/golden/models.json) are today's CPU numbers with one thread; see
tests/golden/make_models_golden.py for what is recorded and how to regenerate it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
from make_models_golden import GOLDEN, fingerprint, method_specs  # noqa: E402

PINNED = json.loads(GOLDEN.read_text())


def test_every_implemented_method_is_pinned():
    assert sorted(PINNED) == sorted(method_specs())


@pytest.mark.parametrize("method", sorted(PINNED))
def test_method_matches_golden_exactly(method):
    got = fingerprint(method_specs()[method])
    want = PINNED[method]
    assert list(got["state"]) == list(want["state"])  # same keys: checkpoints, feature cache
    assert got == want  # exact: no approx, a refactor must not move a single bit
