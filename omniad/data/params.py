"""Loading the dataset facts of params/datasets.yaml (categories, archives, expected counts)."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from omniad.data.samples import DatasetError

DEFAULT_PARAMS_PATH = Path(__file__).resolve().parents[2] / "params" / "datasets.yaml"
PARAMS_ENV = "OMNIAD_DATASETS_PARAMS"  # a datasets.yaml file
PARAMS_DIR_ENV = "OMNIAD_PARAMS"  # the project's params/ directory (tests and forks move it)
MIRROR_ENV = "OMNIAD_DATA_MIRROR"  # mirror base URLs or local directories, space-separated
CHECKSUMS_ENV = "OMNIAD_CHECKSUMS"  # directory of the checksum locks (default params/checksums)
LAYOUTS = ("mvtec", "visa", "real_iad", "dtd")
COUNT_KEYS = ("train_normal", "train_anomaly", "test_normal", "test_anomaly")

Params = dict[str, Any]


def load_params(path: Path | str | None = None) -> Params:
    """Read and validate the dataset facts.

    Path: the argument, else $OMNIAD_DATASETS_PARAMS, else $OMNIAD_PARAMS/datasets.yaml, else
    params/datasets.yaml of this checkout. Validated at load so that a typo in the YAML fails
    here, not halfway through a download.
    """
    if path is None:
        if os.environ.get(PARAMS_ENV):
            path = os.environ[PARAMS_ENV]
        elif os.environ.get(PARAMS_DIR_ENV):
            path = Path(os.environ[PARAMS_DIR_ENV]) / "datasets.yaml"
        else:
            path = DEFAULT_PARAMS_PATH
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DatasetError(f"{path}: cannot read dataset params: {exc}") from exc
    validate_params(doc, source=str(path))
    doc["source_path"] = str(path.absolute())  # the lock and the hints are found from it
    return doc


def validate_params(doc: Any, source: str = "params") -> None:
    """Raise DatasetError naming the first structural fault of a params document."""
    if not isinstance(doc, dict) or not isinstance(doc.get("datasets"), dict):
        raise DatasetError(f"{source}: expected a mapping with a 'datasets' mapping")
    for name, facts in doc["datasets"].items():
        where = f"{source}: datasets.{name}"
        if not isinstance(facts, dict):
            raise DatasetError(f"{where}: expected a mapping")
        if facts.get("layout") not in LAYOUTS:
            raise DatasetError(f"{where}.layout: expected one of {LAYOUTS}")
        cats = facts.get("categories")
        if not isinstance(cats, list) or not cats or len(set(cats)) != len(cats):
            raise DatasetError(f"{where}.categories: expected a non-empty list without repeats")
        for arch in facts.get("archives", []):
            if not isinstance(arch, dict) or not arch.get("name"):
                raise DatasetError(f"{where}.archives: every archive needs a name")
            urls = arch.get("urls", [])
            if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
                raise DatasetError(f"{where}.archives[{arch['name']}].urls: expected a list")
            sha = arch.get("sha256")
            if sha is not None and (len(str(sha)) != 64 or not _is_hex(str(sha))):
                raise DatasetError(f"{where}.archives[{arch['name']}].sha256: not a SHA-256")
        expected = facts.get("expected") or {}
        for key in ("totals", "each_category"):
            _check_counts(expected.get(key) or {}, f"{where}.expected.{key}")
        for cat, counts in (expected.get("per_category") or {}).items():
            if cat not in cats:
                raise DatasetError(f"{where}.expected.per_category: unknown category {cat!r}")
            _check_counts(counts, f"{where}.expected.per_category.{cat}")


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


def _check_counts(counts: Mapping[str, Any], where: str) -> None:
    for key, value in counts.items():
        if key not in COUNT_KEYS or not isinstance(value, int) or value < 0:
            raise DatasetError(f"{where}.{key}: expected one of {COUNT_KEYS} with a count >= 0")


def dataset_facts(name: str, params: Params | None = None) -> dict[str, Any]:
    """The facts of one dataset; an unknown dataset name is a DatasetError."""
    params = params if params is not None else load_params()
    try:
        return params["datasets"][name]
    except KeyError:
        known = ", ".join(sorted(params["datasets"]))
        raise DatasetError(f"unknown dataset {name!r} (known: {known})") from None


def resolve_categories(
    name: str, facts: Mapping[str, Any], categories: Iterable[str] | None
) -> list[str]:
    """The requested categories in params order; unknown ones are an error, not skipped."""
    known: list[str] = list(facts["categories"])
    if categories is None:
        return known
    wanted = list(dict.fromkeys(categories))
    unknown = [c for c in wanted if c not in known]
    if unknown:
        raise DatasetError(f"{name}: unknown categor{'y' if len(unknown) == 1 else 'ies'} "
                           f"{', '.join(map(repr, unknown))} (known: {', '.join(known)})")
    if not wanted:
        raise DatasetError(f"{name}: empty category list")
    return [c for c in known if c in wanted]


def override(params: Params, name: str, **fields: Any) -> Params:
    """A deep copy of params with some facts of one dataset replaced (tests, private mirrors)."""
    out = copy.deepcopy(params)
    out["datasets"].setdefault(name, {}).update(copy.deepcopy(fields))
    validate_params(out, source="params override")
    return out


def mirrors(params: Params) -> list[str]:
    """Mirror bases (URLs or local directories) in order: $OMNIAD_DATA_MIRROR, then params."""
    out = os.environ.get(MIRROR_ENV, "").split()
    listed = params.get("mirrors") or []
    out += [listed] if isinstance(listed, str) else list(listed)
    if params.get("mirror"):  # the older single-mirror key
        out.append(params["mirror"])
    return list(dict.fromkeys(out))


def params_path(params: Params) -> Path:
    """The datasets.yaml these params were read from (the repo's for built-in ones)."""
    return Path(params.get("source_path") or DEFAULT_PARAMS_PATH)


def checksums_dir(params: Params) -> Path:
    """Where the checksum locks live: $OMNIAD_CHECKSUMS, else params/checksums beside the YAML."""
    if os.environ.get(CHECKSUMS_ENV):
        return Path(os.environ[CHECKSUMS_ENV]).absolute()
    return params_path(params).parent / "checksums"
