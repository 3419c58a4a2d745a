"""The benchmark method shared by every `make bench` section: A and B in alternating repeats.

    cmp = alternate(service_call, in_process_call, repeats=5, warmup=1, work_a=32, work_b=32)
    print(cmp.report("service / in-process, batch 32", target=0.9))

Timing A in one block and B in another lets machine noise (other processes on a shared 2-core
box) decide the ratio. Here A and B take turns (A B A B …, after a warm-up of each), every
repeat is timed on its own, and each arm reports min / median / max throughput. The ratio is
of medians; its spread is the worst case either way (A's slowest over B's fastest, and the
reverse). A target inside that spread is reported as inconclusive, not as met or missed.

A repeat runs the arm's callable `inner` times back to back (calibrated from the warm-up so
a repeat lasts at least `min_block_s`). A callable may return a float: that is the time of
its timed part, in seconds, so per-repeat setup (making a new image, say) stays out of it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable


@dataclasses.dataclass
class Arm:
    name: str
    rates: list[float]  # work units per second, one per repeat
    inner: int

    @property
    def min(self) -> float:
        return min(self.rates)

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def max(self) -> float:
        return max(self.rates)

    def line(self, unit: str) -> str:
        return f"{self.name:>22s}: min {self.min:10.2f}  median {self.median:10.2f}  max {self.max:10.2f} {unit}"


@dataclasses.dataclass
class Comparison:
    a: Arm
    b: Arm

    @property
    def ratio(self) -> float:
        """Throughput of A over throughput of B, medians."""
        return self.a.median / self.b.median

    @property
    def spread(self) -> tuple[float, float]:
        return self.a.min / self.b.max, self.a.max / self.b.min

    def verdict(self, target: float, at_least: bool = True) -> str:
        """For the A/B ratio: meets / MISSES, or inconclusive when the spread crosses target."""
        return self._verdict_of(*self.spread, target, at_least)

    def report(self, title: str, unit: str = "/s", target: float | None = None, at_least: bool = True,
               ratio_name: str = "A/B") -> str:
        """Both arms and the ratio line. For a time ratio (B takes x times as long as A), give
        both arms the same work: A's throughput over B's is B's time over A's."""
        lo, hi = self.spread
        r = self.ratio
        lines = [title, self.a.line(unit), self.b.line(unit)]
        goal = ""
        if target is not None:
            goal = f"  target {'>=' if at_least else '<='} {target:g}: {self._verdict_of(lo, hi, target, at_least)}"
        lines.append(f"{'ratio ' + ratio_name:>22s}: {r:.2f}x (spread {lo:.2f}-{hi:.2f}){goal}")
        return "\n".join(lines)

    @staticmethod
    def _verdict_of(lo: float, hi: float, target: float, at_least: bool) -> str:
        if lo <= target <= hi:
            return "inconclusive: spread crosses the target"
        return "meets" if (lo > target if at_least else hi < target) else "MISSES"

    def to_dict(self) -> dict:
        return {"a": dataclasses.asdict(self.a), "b": dataclasses.asdict(self.b), "ratio_of_medians": self.ratio,
                "spread": list(self.spread)}


def _run(fn: Callable[[], object], inner: int) -> float:
    timed = 0.0
    t0 = time.perf_counter()
    for _ in range(inner):
        got = fn()
        if isinstance(got, float):
            timed += got
    wall = time.perf_counter() - t0
    return timed if timed > 0 else wall


def alternate(a: Callable[[], object], b: Callable[[], object], *, repeats: int = 5, warmup: int = 1,
              work_a: float = 1.0, work_b: float = 1.0, names: tuple[str, str] = ("A", "B"),
              min_block_s: float = 0.0) -> Comparison:
    """Time a and b in alternating repeats; work_* are the units one call does (rows, images)."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    warm = [0.0, 0.0]
    for _ in range(max(warmup, 1 if min_block_s > 0 else 0)):
        warm[0] = _run(a, 1)
        warm[1] = _run(b, 1)
    inner = [1, 1]
    if min_block_s > 0:
        inner = [max(1, math.ceil(min_block_s / max(w, 1e-9))) for w in warm]
    rates: tuple[list[float], list[float]] = ([], [])
    for r in range(repeats):
        # Swap the order every other repeat, so neither arm always runs right after the other.
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for k in order:
            fn, work = (a, work_a) if k == 0 else (b, work_b)
            dt = _run(fn, inner[k])
            rates[k].append(work * inner[k] / max(dt, 1e-12))
    return Comparison(Arm(names[0], rates[0], inner[0]), Arm(names[1], rates[1], inner[1]))
