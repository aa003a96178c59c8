"""Baselines of Table I, one readable file per method (facts: /work/shared/BASELINES.md)."""
