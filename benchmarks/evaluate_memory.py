"""Peak memory (RSS) of ``task=evaluate`` against the number of images.

Each run is a separate CLI process started from this small parent (which imports no torch), so its
``ru_maxrss`` (``os.wait4``) is the run's own peak. The runs use the digits CNN on seeded synthetic 32 x 32
images and, to fit on a small CPU, fewer methods and metric steps than ``experiment=evaluate_digits``
(vanilla gradients and excitation pullbacks at one temperature, 4 deletion/insertion steps, one ascent step,
no randomization check); the per-image work changes, the data path and the result gathering do not.

Measured on a shared 2-core machine (peak RSS, MB, at 64 / 512 / 4096 images): 1055 / 1070 / 1733 when every
batch's predictions were held until the end of the pass and the images stacked up front; 999 / 987 / 1013 with
the batches written as shards and the images read batch by batch (the per-image tables are 1.3 MB of CSV at
4096 images).

    PYTHONPATH=src .venv/bin/python benchmarks/evaluate_memory.py                  # 64 512 4096 images
    PYTHONPATH=src .venv/bin/python benchmarks/evaluate_memory.py --images 64 512 --full
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REDUCED = [
    "evaluate.methods=[vanilla,excitation]",
    "evaluate.ascent_methods=[vanilla]",
    "temperatures=[0.3]",
    "gate.temperature=0.3",
    "evaluate.perturbation_steps=4",
    "evaluate.randomization_images=0",
    "ascent.steps=1",
    "batch_size=64",
]


def measure(n: int, out: Path, full: bool) -> tuple[float, float, int]:
    """Run evaluate on ``n`` images -> (peak RSS in MB, wall seconds, exit status)."""
    args = [
        sys.executable,
        "-m",
        "excitation_pullbacks.pipeline.cli",
        "experiment=evaluate_digits",
        "data=synthetic",
        f"data.num_images={n}",
        "data.crop=32",
        "data.resize=32",
        f"evaluate.num_images={n}",
        "logger=none",
        f"output_dir={out}",
        *([] if full else REDUCED),
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=False)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.stderr.write(proc.stderr.read().decode(errors="replace")[-2000:])
    return usage.ru_maxrss / 1024, wall, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[64, 512, 4096])
    parser.add_argument("--full", action="store_true", help="experiment=evaluate_digits's methods and metrics")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'images':>7} {'peak RSS MB':>12} {'wall s':>8} {'tables MB':>10}")
        for n in args.images:
            out = Path(tmp) / str(n)
            rss, wall, code = measure(n, out, args.full)
            tables = sum(p.stat().st_size for p in (out / "results").glob("*.csv")) / 2**20 if code == 0 else 0.0
            print(f"{n:>7} {rss:>12.1f} {wall:>8.1f} {tables:>10.2f}" + ("" if code == 0 else f"  (exit {code})"))


if __name__ == "__main__":
    main()
