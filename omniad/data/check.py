"""Validate an extracted dataset against its facts (`omniad data check`).

Every image and mask is decoded in full (PIL's verify() only parses headers and misses a
truncated image), masks must have their image's size, every file must still hash to what the
manifest recorded, and the per-split, per-category counts must equal the expected ones.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from omniad.data.manifest import MANIFEST_NAME, read_manifest
from omniad.data.params import COUNT_KEYS, Params, dataset_facts, load_params, resolve_categories
from omniad.data.readers import read_samples
from omniad.data.samples import SPLITS, DatasetError, Sample


@dataclass
class CheckReport:
    """Outcome of a check: counts beside expectations, and every problem found."""

    dataset: str
    root: Path
    categories: list[str]
    splits: tuple[str, ...]
    counts: dict[str, dict[str, dict[str, int]]]  # split -> category -> {normal, anomaly}
    expected: dict[str, dict[str, int]]  # "<split>/<category>" or "<split>/(total)" -> {key: n}
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    n_files: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_for_problems(self) -> None:
        """Raise DatasetError listing the problems (for callers that want an exception)."""
        if self.problems:
            head = "\n  ".join(self.problems[:20])
            more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
            raise DatasetError(f"{self.root}: {self.dataset} failed its check:\n  {head}{more}")

    def table(self) -> str:
        """Per-split, per-category counts beside the expected ones ('-' = no expectation)."""
        width = max([len(c) for c in self.categories] + [8])
        lines = [f"{'split':<6} {'category':<{width}} {'normal':>7} {'expected':>8} "
                 f"{'anomalous':>9} {'expected':>8}  status"]

        def row(split: str, name: str, got: dict[str, int], exp: dict[str, int]) -> str:
            cells, status = [], "ok"
            for kind, w in (("normal", 7), ("anomaly", 9)):
                want = exp.get(f"{split}_{kind}")
                cells.append(f"{got.get(kind, 0):>{w}} {('-' if want is None else want):>8}")
                if want is not None and want != got.get(kind, 0):
                    status = "MISMATCH"
            if not exp:
                status = "-"
            return f"{split:<6} {name:<{width}} {cells[0]} {cells[1]}  {status}"

        for split in self.splits:
            total = {"normal": 0, "anomaly": 0}
            for cat in self.categories:
                got = self.counts.get(split, {}).get(cat, {})
                total["normal"] += got.get("normal", 0)
                total["anomaly"] += got.get("anomaly", 0)
                lines.append(row(split, cat, got, self.expected.get(f"{split}/{cat}", {})))
            lines.append(row(split, "(total)", total, self.expected.get(f"{split}/(total)", {})))
        return "\n".join(lines)

    def summary(self) -> str:
        verdict = "OK" if self.ok else f"FAILED ({len(self.problems)} problems)"
        return f"{self.dataset} at {self.root}: {self.n_files} files decoded: {verdict}"


def expected_counts(
    name: str,
    root: Path,
    facts: dict[str, Any],
    categories: list[str],
    whole: bool,
) -> dict[str, dict[str, int]]:
    """Expected counts keyed "<split>/<category>" and "<split>/(total)".

    From params, except for a generated set (demo), whose generator recorded its counts in its
    manifest. Totals apply only when the whole dataset is checked.
    """
    if facts.get("generated"):
        manifest = read_manifest(root)
        if manifest is None or "expected" not in manifest:
            raise DatasetError(f"{root / MANIFEST_NAME}: missing generator counts; "
                               f"regenerate with `omniad data demo --root {root}`")
        source = manifest["expected"]
    else:
        source = facts.get("expected") or {}
    out: dict[str, dict[str, int]] = {}

    def put(target: str, counts: dict[str, int]) -> None:
        for key, value in counts.items():
            split = key.split("_")[0]
            out.setdefault(f"{split}/{target}", {})[key] = value

    for cat in categories:
        put(cat, source.get("each_category") or {})
        put(cat, (source.get("per_category") or {}).get(cat) or {})
    if whole:
        put("(total)", source.get("totals") or {})
    return out


def _inspect(
    sample: Sample, hashes: dict[str, str] | None, root: Path, resolution: int | None = None
) -> tuple[list[str], int]:
    """(problems, files decoded) of one sample: unreadable/undecodable files, size mismatch,
    changed bytes, and (resolution given) an image whose longer side is not that resolution."""
    problems: list[str] = []
    sizes = {}
    for kind, path in (("image", sample.image), ("mask", sample.mask)):
        if path is None:
            continue
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            problems.append(f"{path}: cannot read {kind}: {exc}")
            continue
        if hashes is not None:
            rel = _relative(path, root)
            want = hashes.get(rel)
            if want is None:
                problems.append(f"{path}: {kind} not listed in {MANIFEST_NAME}")
            elif hashlib.sha256(data).hexdigest() != want:
                problems.append(f"{path}: {kind} changed since it was recorded (SHA-256 differs "
                                f"from {MANIFEST_NAME})")
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # full decode; verify() would miss truncated pixel data
                sizes[kind] = im.size
                if kind == "mask" and sample.label == 1 and not np.asarray(im).any():
                    problems.append(f"warning: {path}: anomalous sample with an empty mask")
        except UnidentifiedImageError:  # its text names the BytesIO, not the file
            problems.append(f"{path}: cannot decode {kind}: not an image file of a known "
                            "format (corrupt or not an image)")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            problems.append(f"{path}: cannot decode {kind}: {exc}")
    if resolution is not None and "image" in sizes and max(sizes["image"]) != resolution:
        w, h = sizes["image"]
        problems.append(f"{sample.image}: image is {w}x{h}, but this variant's images have a "
                        f"longer side of {resolution} px (a folder of another resolution "
                        "under this variant's name?)")
    if "image" in sizes and "mask" in sizes and sizes["image"] != sizes["mask"]:
        (mw, mh), (iw, ih) = sizes["mask"], sizes["image"]
        problems.append(f"{sample.mask}: mask size {mw}x{mh} differs from image size {iw}x{ih} "
                        f"({sample.image.name})")
    return problems, len(sizes)


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).absolute().relative_to(root).as_posix()
    except ValueError:
        return str(path)


def check_dataset(
    name: str,
    root: Path | str,
    *,
    categories: list[str] | None = None,
    params: Params | None = None,
    workers: int | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    use_manifest: bool = True,
    **reader_opts: Any,
) -> CheckReport:
    """Check layout, pairing, decoding, sizes, manifest hashes and counts; returns a report.

    Faults inside the tree are collected in report.problems (report.ok is False); an unknown
    dataset or category, a missing root, or a root holding another dataset raises
    DatasetError at once. use_manifest=False checks a tree about to be (re)recorded.
    """
    params = params if params is not None else load_params()
    facts = dataset_facts(name, params)
    cats = resolve_categories(name, facts, categories)
    root = Path(root).absolute()
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root of {name} does not exist")
    splits = ("train",) if facts["layout"] == "dtd" else SPLITS
    whole = categories is None and not reader_opts.get("views")
    report = CheckReport(name, root, cats, splits, {}, {})
    try:
        report.expected = expected_counts(name, root, facts, cats, whole)
    except DatasetError as exc:
        report.problems.append(str(exc))
    manifest = None
    try:
        manifest = read_manifest(root) if use_manifest else None
    except DatasetError as exc:
        report.problems.append(str(exc))
    if manifest is not None and manifest.get("dataset") != name:
        raise DatasetError(f"{root}: holds dataset {manifest.get('dataset')!r} (by its "
                           f"{MANIFEST_NAME}), not {name!r}")
    resolution = None
    if facts.get("resolutions"):
        variant = reader_opts.get("variant") or facts.get("default_variant")
        resolution = facts["resolutions"].get(variant)
        recorded = (manifest or {}).get("variants")
        if recorded is not None and variant not in recorded:
            report.problems.append(f"{root}: variant {variant} was not fetched here (has "
                                   f"{', '.join(recorded) or 'none'}); fetch it with "
                                   f"`omniad data fetch {name} --root {root} --variant {variant}`")
    hashes = {f["path"]: f["sha256"] for f in manifest["files"]} if manifest else None
    if manifest is None and use_manifest:
        report.warnings.append(f"{root}: no {MANIFEST_NAME}; file hashes not compared")

    samples: list[Sample] = []
    for split in splits:
        report.counts[split] = {}
        for cat in cats:
            try:
                found = read_samples(name, root, split, [cat], params=params,
                                     on_fault=report.problems.append, **reader_opts)
            except DatasetError as exc:
                report.problems.append(str(exc))
                found = []
            labels = [s.label for s in found]
            report.counts[split][cat] = {"normal": labels.count(0), "anomaly": labels.count(1)}
            samples += found

    bar = tqdm(total=len(samples), desc=f"check {name}", disable=not progress)
    with bar, ThreadPoolExecutor(workers or len(os.sched_getaffinity(0))) as pool:
        for found, decoded in pool.map(lambda s: _inspect(s, hashes, root, resolution), samples):
            for msg in found:
                (report.warnings if msg.startswith("warning: ") else report.problems).append(msg)
            report.n_files += decoded  # only files that decoded
            bar.update()

    for target, exp in report.expected.items():
        split, _, cat = target.partition("/")
        if cat == "(total)":
            got = {k: sum(c[k] for c in report.counts.get(split, {}).values())
                   for k in ("normal", "anomaly")}
        else:
            got = report.counts.get(split, {}).get(cat, {})
        for key, want in exp.items():
            kind = key.split("_", 1)[1]
            if key in COUNT_KEYS and got.get(kind, 0) != want:
                report.problems.append(f"{root}: count mismatch for {split}/{cat} {kind}: "
                                       f"found {got.get(kind, 0)}, expected {want}")
    if log is not None:
        log(report.table())
    return report
