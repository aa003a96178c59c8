"""Readers that turn an extracted dataset tree into a list of Samples.

Categories always come from params/datasets.yaml, and images are paired with their masks by
file name (never by list position), so a missing or extra file is an error naming that file
instead of a silent shift of every label after it.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from omniad.data.params import Params, dataset_facts, resolve_categories
from omniad.data.samples import NORMAL_DEFECT, SPLITS, DatasetError, Sample

MASK_SUFFIX = "_mask"
_VIEW_RE = re.compile(r"_C(\d+)_")


def read_samples(
    dataset: str,
    root: Path | str,
    split: str,
    categories: list[str] | None = None,
    *,
    params: Params | None = None,
    on_fault: Fault | None = None,
    **opts: Any,
) -> list[Sample]:
    """All samples of one split of a dataset, in params category order then file-name order.

    opts are layout-specific: Real-IAD takes `variant` (realiad_256/512/1024) and `views`
    (camera views to keep, e.g. [1, 3] or ["C1"]). Raises DatasetError on any layout fault,
    an unknown category, or a category whose split is empty; with `on_fault`, a fault of one
    file (stray, unpaired, missing) is passed to it and that file skipped instead, so that
    `check` reports every bad file and still counts the good ones.
    """
    facts = dataset_facts(dataset, params)
    cats = resolve_categories(dataset, facts, categories)
    if split not in SPLITS:
        raise DatasetError(f"{dataset}: unknown split {split!r} (expected one of {SPLITS})")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root of {dataset} does not exist")
    reader = _READERS[facts["layout"]]
    fault = on_fault if on_fault is not None else _raise
    samples = reader(root, split, cats, facts, fault, **opts)
    for cat in cats:
        if not any(s.category == cat for s in samples):
            fault(f"{root}: empty split: {dataset}/{cat} has no {split} images")
    return samples


Fault = Callable[[str], None]


def _raise(msg: str) -> None:
    raise DatasetError(msg)


def image_suffixes(facts: Mapping[str, Any]) -> set[str]:
    """Lower-case image suffixes of a dataset (VisA ships .JPG, so matching ignores case)."""
    return {s.lower() for s in facts.get("image_suffixes", [".png", ".jpg", ".jpeg"])}


def _visible_entries(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if not p.name.startswith("."))


def _image_files(directory: Path, suffixes: set[str], fault: Fault = _raise) -> list[Path]:
    """Image files of a directory; anything else there is a fault, not silently skipped."""
    files = []
    for path in _visible_entries(directory):
        if path.is_dir():
            fault(f"{path}: unexpected directory among images")
        elif path.suffix.lower() not in suffixes:
            fault(f"{path}: unexpected file (not an image: {sorted(suffixes)})")
        else:
            files.append(path)
    return files


def _read_mvtec(
    root: Path, split: str, cats: list[str], facts: Mapping[str, Any], fault: Fault
) -> list[Sample]:
    """MVTec layout: <cat>/{train,test}/<defect>/*.png, <cat>/ground_truth/<defect>/*_mask.png."""
    suffixes = image_suffixes(facts)
    samples: list[Sample] = []
    for cat in cats:
        cat_dir = root / cat
        if not cat_dir.is_dir():
            raise DatasetError(f"{cat_dir}: missing category directory")
        split_dir = cat_dir / split
        if not split_dir.is_dir():
            raise DatasetError(f"{split_dir}: missing {split} directory")
        defect_dirs = []
        for d in _visible_entries(split_dir):
            if d.is_dir():
                defect_dirs.append(d)
            else:
                fault(f"{d}: unexpected file (expected defect directories)")
        defects = sorted((d.name for d in defect_dirs), key=lambda n: (n != NORMAL_DEFECT, n))
        if split == "train" and defects != [NORMAL_DEFECT]:
            fault(f"{split_dir}: train must hold only good/, found {defects}")
            defects = [d for d in defects if d == NORMAL_DEFECT]
        gt_dir = cat_dir / "ground_truth"
        for defect in defects:
            images = _image_files(split_dir / defect, suffixes, fault)
            if defect == NORMAL_DEFECT:
                samples += [Sample(p, None, 0, cat, defect, split) for p in images]
                continue
            try:
                masks = _masks_by_stem(gt_dir / defect, suffixes, fault)
            except DatasetError as exc:
                fault(str(exc))
                continue
            for img in images:
                mask = masks.pop(img.stem, None)
                if mask is None:
                    fault(f"{img}: image without its mask "
                          f"(expected {gt_dir / defect / (img.stem + MASK_SUFFIX)}.*)")
                    continue
                samples.append(Sample(img, mask, 1, cat, defect, split))
            for stem in sorted(masks):
                fault(f"{masks[stem]}: mask without its image "
                      f"(expected {split_dir / defect / stem}.*)")
        if split == "test" and gt_dir.is_dir():
            for d in _visible_entries(gt_dir):
                if d.name not in defects:
                    fault(f"{d}: masks without images (no {split_dir / d.name})")
    return samples


def _masks_by_stem(mask_dir: Path, suffixes: set[str], fault: Fault = _raise
                   ) -> dict[str, Path]:
    """Map image stem -> mask path for <stem>_mask.<ext> files of a ground-truth directory."""
    if not mask_dir.is_dir():
        raise DatasetError(f"{mask_dir}: missing ground-truth directory")
    masks: dict[str, Path] = {}
    for path in _image_files(mask_dir, suffixes | {".png"}, fault):
        if not path.stem.endswith(MASK_SUFFIX):
            fault(f"{path}: mask file name must end with {MASK_SUFFIX}")
            continue
        stem = path.stem[: -len(MASK_SUFFIX)]
        if stem in masks:
            fault(f"{path}: second mask for image stem {stem!r} ({masks[stem]})")
            continue
        masks[stem] = path
    return masks


def _inside(root: Path, rel: str, where: str) -> Path:
    """root/rel for a relative path from a metadata file; absolute or '..' paths are errors."""
    pure = PurePosixPath(rel.replace("\\", "/"))
    if not rel or pure.is_absolute() or ".." in pure.parts:
        raise DatasetError(f"{where}: path {rel!r} must be relative and stay inside {root}")
    return root.joinpath(*pure.parts)


def _paired(image: Path, mask: Path, where: str) -> None:
    """Explicitly listed masks must still carry their image's name (stem or stem + _mask)."""
    if mask.stem not in (image.stem, image.stem + MASK_SUFFIX):
        raise DatasetError(f"{where}: mask {mask.name} does not match image {image.name} by name")


def _must_exist(path: Path, what: str, where: str) -> None:
    if not path.is_file():
        raise DatasetError(f"{path}: {what} listed in {where} does not exist")


def _read_visa(
    root: Path, split: str, cats: list[str], facts: Mapping[str, Any], fault: Fault
) -> list[Sample]:
    """VisA: split_csv/1cls.csv rows; train = normal train rows, test = every other row."""
    csv_path = root / facts.get("split_file", "split_csv/1cls.csv")
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: missing VisA split file")
    known = set(facts["categories"])
    wanted = set(cats)
    samples: list[Sample] = []
    seen: set[Path] = set()
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"object", "split", "label", "image", "mask"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(f"{csv_path}: missing columns {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            try:
                sample = _visa_row(root, row, f"{csv_path}:{line}", known, wanted, split, seen)
            except DatasetError as exc:
                fault(str(exc))
                continue
            if sample is not None:
                samples.append(sample)
    order = {c: i for i, c in enumerate(cats)}
    samples.sort(key=lambda s: (order[s.category], s.image.as_posix()))
    return samples


def _visa_row(root: Path, row: Mapping[str, str], where: str, known: set[str],
              wanted: set[str], split: str, seen: set[Path]) -> Sample | None:
    """The sample of one 1cls.csv row, None when it belongs to another object or split."""
    obj = (row["object"] or "").strip()
    if obj not in known:
        raise DatasetError(f"{where}: unknown object {obj!r}")
    label_text = (row["label"] or "").strip().lower()
    if label_text not in ("normal", "anomaly"):
        raise DatasetError(f"{where}: label must be normal or anomaly, got {label_text!r}")
    row_split = (row["split"] or "").strip().lower()
    if row_split not in SPLITS:
        raise DatasetError(f"{where}: split must be train or test, got {row_split!r}")
    label = int(label_text == "anomaly")
    is_train = row_split == "train" and label == 0
    if obj not in wanted or (split == "train") != is_train:
        return None
    image = _inside(root, (row["image"] or "").strip(), where)
    if image in seen:
        raise DatasetError(f"{where}: image {image} listed twice")
    seen.add(image)
    _must_exist(image, "image", where)
    mask_rel = (row["mask"] or "").strip()
    mask = None
    if label:
        if not mask_rel:
            raise DatasetError(f"{image}: image without its mask ({where} has none)")
        mask = _inside(root, mask_rel, where)
        _paired(image, mask, where)
        _must_exist(mask, "mask", where)
    elif mask_rel:
        raise DatasetError(f"{where}: normal image {image.name} has a mask {mask_rel!r}")
    defect = "anomaly" if label else NORMAL_DEFECT
    return Sample(image, mask, label, obj, defect, split)


def _parse_views(views: Iterable[int | str] | None, allowed: list[int]) -> set[int] | None:
    if views is None:
        return None
    out = set()
    for v in views:
        text = str(v).upper().removeprefix("C")
        if not text.isdigit() or int(text) not in allowed:
            raise DatasetError(f"real_iad: unknown camera view {v!r} (known: C1..C{max(allowed)})")
        out.add(int(text))
    return out


def camera_view(path: Path | str) -> int | None:
    """The Real-IAD camera view (1..5) encoded in a file name as _C<n>_, or None."""
    match = _VIEW_RE.search(Path(path).name)
    return int(match.group(1)) if match else None


def _read_real_iad(
    root: Path,
    split: str,
    cats: list[str],
    facts: Mapping[str, Any],
    fault: Fault,
    *,
    variant: str | None = None,
    views: Iterable[int | str] | None = None,
) -> list[Sample]:
    """Real-IAD: realiad_jsons/<obj>.json; paths relative to <variant>/<meta.prefix or obj>/."""
    variant = variant or facts["default_variant"]
    if variant not in facts["variants"]:
        raise DatasetError(f"real_iad: unknown resolution variant {variant!r} "
                           f"(known: {', '.join(facts['variants'])})")
    keep = _parse_views(views, list(facts.get("views", [1, 2, 3, 4, 5])))
    meta_dir = root / facts.get("metadata_dir", "realiad_jsons")
    samples: list[Sample] = []
    for cat in cats:
        json_path = meta_dir / f"{cat}.json"
        try:
            doc = json.loads(json_path.read_text())
        except FileNotFoundError:
            raise DatasetError(f"{json_path}: missing Real-IAD metadata file") from None
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{json_path}: unreadable metadata: {exc}") from exc
        meta = doc.get("meta") or {}
        normal_class = meta.get("normal_class", "OK")
        base = root / variant / (meta.get("prefix") or cat)
        entries = doc.get(split)
        if not isinstance(entries, list):
            raise DatasetError(f"{json_path}: no {split!r} list")
        for i, entry in enumerate(entries):
            try:
                sample = _real_iad_entry(entry, f"{json_path} [{split}][{i}]", base, cat,
                                         normal_class, keep, split)
            except DatasetError as exc:
                fault(str(exc))
                continue
            if sample is not None:
                samples.append(sample)
    return samples


def _real_iad_entry(entry: Any, where: str, base: Path, cat: str, normal_class: str,
                    keep: set[int] | None, split: str) -> Sample | None:
    """The sample of one Real-IAD json entry, None when its camera view is not kept."""
    if not isinstance(entry, dict) or "image_path" not in entry:
        raise DatasetError(f"{where}: expected an object with image_path")
    if entry.get("category", cat) != cat:
        raise DatasetError(f"{where}: category {entry.get('category')!r} != {cat!r}")
    label = int(entry.get("anomaly_class", normal_class) != normal_class)
    image = _inside(base, str(entry["image_path"]), where)
    view = camera_view(image)
    if view is None:
        raise DatasetError(f"{where}: no camera view (_C1_.._C5_) in {image.name}")
    if keep is not None and view not in keep:
        return None
    _must_exist(image, "image", where)
    mask_rel = entry.get("mask_path")
    mask = None
    if label:
        if not mask_rel:
            raise DatasetError(f"{image}: image without its mask ({where})")
        mask = _inside(base, str(mask_rel), where)
        _paired(image, mask, where)
        _must_exist(mask, "mask", where)
    elif mask_rel:
        raise DatasetError(f"{where}: normal image {image.name} has a mask {mask_rel!r}")
    defect = str(entry["anomaly_class"]) if label else NORMAL_DEFECT
    return Sample(image, mask, label, cat, defect, split)


def _read_dtd(root: Path, split: str, cats: list[str], facts: Mapping[str, Any],
              fault: Fault) -> list[Sample]:
    """DTD: <images_dir>/<texture>/*.jpg; one split ("train") holding every image."""
    if split != "train":
        raise DatasetError(f"{root}: empty split: DTD has only a train split (all images)")
    images_dir = root / facts.get("images_dir", "dtd/images")
    suffixes = image_suffixes(facts)
    samples = []
    for cat in cats:
        tex_dir = images_dir / cat
        if not tex_dir.is_dir():
            raise DatasetError(f"{tex_dir}: missing texture directory")
        samples += [Sample(p, None, 0, cat, NORMAL_DEFECT, split)
                    for p in _image_files(tex_dir, suffixes, fault)]
    return samples


_READERS: dict[str, Callable[..., list[Sample]]] = {
    "mvtec": _read_mvtec,
    "visa": _read_visa,
    "real_iad": _read_real_iad,
    "dtd": _read_dtd,
}
