"""The sample record every reader returns, and the error type for bad dataset input."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")
NORMAL_DEFECT = "good"


class DatasetError(ValueError):
    """Bad dataset input (layout, pairing, checksum, decoding...).

    A ValueError so callers that already handle bad values handle it too; the message always
    names the offending file (or directory/URL) and the fault.
    """


class ChecksumError(DatasetError):
    """A file's SHA-256 differs from the expected one; the file is never used."""


class ArchiveError(DatasetError):
    """An archive is truncated, corrupt, or holds a member that would escape the target."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One image of a dataset split: where it is, its mask, and its labels.

    Frozen so that sample lists can be shared, hashed and cached without defensive copies.
    """

    image: Path
    mask: Path | None
    label: int  # 0 = normal, 1 = anomalous
    category: str
    defect: str  # "good" for normal images
    split: str  # "train" or "test"

    def __post_init__(self) -> None:
        if self.label not in (0, 1):
            raise DatasetError(f"{self.image}: label must be 0 or 1, got {self.label!r}")
        if self.split not in SPLITS:
            raise DatasetError(f"{self.image}: split must be train or test, got {self.split!r}")
        if self.label == 0 and self.defect != NORMAL_DEFECT:
            raise DatasetError(f"{self.image}: normal sample with defect type {self.defect!r}")
