"""The data a method reads by itself (DeSTSeg's DTD textures), handed to it by the factory.

Models never import the data code (their code hash stays theirs): ``omniad.methods``
binds an instance of :class:`DataFiles` to every method it builds (``ADMethod.bind_data``).
"""

from __future__ import annotations

from pathlib import Path


class DataFiles:
    """Dataset folders and image lists as the rest of the pipeline sees them."""

    def dataset_root(self, dataset: str) -> Path:
        """$OMNIAD_DATA/<dataset> (default data/<dataset>)."""
        from omniad.grid import data_root

        return data_root(dataset)

    def image_paths(self, dataset: str, root: Path, split: str) -> list[Path]:
        """The split's image files, read (and checked) by the dataset's reader."""
        from omniad.data.readers import read_samples

        return [s.image for s in read_samples(dataset, root, split)]
