"""How long `make_patient` takes, against the floor of any CT synthesiser measured in the same run.

The peer is the least work a synthetic CT of the same size needs: drawing its Gaussian noise
and storing the volume as int16. Run: ``python -m bench.phantom_speed [--repeats N]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from heartloop.phantom import make_patient


def _best_of(repeats: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def _floor(shape: tuple[int, int, int]) -> None:
    noise = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    noise *= 15.0
    noise.astype(np.int16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    make_patient(0, rows=64, n_slices=20)  # warm imports and caches
    for rows, n_slices in ((512, 150), (128, 40)):
        made = _best_of(args.repeats, lambda r=rows, n=n_slices: make_patient(1, rows=r, n_slices=n))
        peer = _best_of(args.repeats, lambda r=rows, n=n_slices: _floor((n, r, r)))
        print(f"make_patient rows={rows} n_slices={n_slices}: {made:.3f} s; "
              f"noise+int16 floor {peer:.3f} s; ratio {made / peer:.1f}x")


if __name__ == "__main__":
    main()
