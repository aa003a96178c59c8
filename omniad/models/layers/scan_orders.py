"""The scan orders of a 2-D map read as 1-D sequences: Hilbert curves of its views.

Hilbert order: the classic ``d2xy`` curve. The official code takes it from the ``hilbert``
package; for every grid side 2-64 the two orders are identical (checked index by index).
"""

from __future__ import annotations

import numpy as np
import torch


# --------------------------------------------------------------------------------------------
# Hilbert scan orders.
# --------------------------------------------------------------------------------------------
def hilbert_order(n: int) -> np.ndarray:
    """Raster indices (row * n + col) of an n x n grid in Hilbert-curve order (n a power of 2)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hilbert scan needs a power-of-two grid side, got {n}")
    order = np.empty(n * n, dtype=np.int64)
    for d in range(n * n):
        x = y = 0
        t, s = d, 1
        while s < n:  # the classic d -> (x, y) walk, one quadrant level per step
            rx = 1 & (t // 2)
            ry = 1 & (t ^ rx)
            if ry == 0:
                if rx == 1:
                    x, y = s - 1 - x, s - 1 - y
                x, y = y, x
            x, y = x + s * rx, y + s * ry
            t //= 4
            s *= 2
        order[d] = y * n + x
    return order


def scan_orders(n: int, directions: int = 8, views: str = "released") -> torch.Tensor:
    """(directions, n*n) raster indices read by each scan, in the released order.

    Base views (the first directions/2 of identity, transpose, rot90, transpose of rot90) each
    read in Hilbert order, then the same sequences reversed. A Hilbert curve's reversal is its
    mirror image, and the transpose of rot90 is a mirror too, so with the released views two
    reversed sequences equal two forward ones (6 distinct of 8, for every curve orientation and
    every n >= 2; the official model has the same property). ``views="rotations"`` uses the four
    rotations instead, whose mirrors are never rotations: 8 distinct sequences.
    """
    grid = torch.arange(n * n).view(n, n)
    if views == "released":
        views_ = [grid, grid.t(), torch.rot90(grid, 1, (0, 1)), torch.rot90(grid, 1, (0, 1)).t()]
    elif views == "rotations":
        views_ = [torch.rot90(grid, k, (0, 1)) for k in range(4)]
    else:
        raise ValueError(f"views must be 'released' or 'rotations', got {views!r}")
    curve = torch.from_numpy(hilbert_order(n))
    base = [v.reshape(-1)[curve] for v in views_[: directions // 2]]
    return torch.stack(base + [b.flip(0) for b in base])
