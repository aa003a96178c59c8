"""Progress: a tqdm bar on a terminal, one plain line per 10% under batch logs (Slurm, CI)."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(self, desc: str, total: int, start: int = 0, every_pct: int = 10) -> None:
        self.desc, self.total, self.start = desc, max(total, 1), start
        self.t0 = time.perf_counter()
        self.interactive = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True) \
            if self.interactive else None
        self.step_pct = every_pct
        self.next_pct = (start * 100 // self.total) // every_pct * every_pct + every_pct
        self.n = start

    def update(self, n: int, note: str = "") -> None:
        if self.bar is not None:
            self.bar.update(n - self.n)
            self.bar.set_postfix_str(note, refresh=False)
        else:
            pct = n * 100 // self.total
            if pct >= self.next_pct or n == self.total:
                done = n - self.start
                rate = done / max(time.perf_counter() - self.t0, 1e-9)
                eta = (self.total - n) / rate if rate > 0 else float("nan")
                print(f"[{self.desc}] {pct:3d}% {n}/{self.total} {note} eta {eta:.0f}s", flush=True)
                self.next_pct = (pct // self.step_pct + 1) * self.step_pct
        self.n = n

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
