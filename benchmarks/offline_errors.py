"""Seconds from start to the one-line error of the ``pullbacks`` command when a data set or weights would need a
download and there is no network: median of repeats, beside a baseline that fails right after start-up.

Run: .venv/bin/python benchmarks/offline_errors.py [--repeats 3] [--step]
--step: time only the failing step (building the data set or the model) inside the subprocess, after start-up.
Rows (each a fresh subprocess, random-weight ResNet18 unless named, HF_HOME/TORCH_HOME in empty folders):
  baseline: data=folder with a missing folder (start-up, then an error at the data step)
  hf offline: data=imagenette_hf with HF_HUB_OFFLINE=1 (not cached)
  hf no network: data=imagenette_hf without HF_HUB_OFFLINE (on a machine without network; else it loads)
  tv no network: data=imagenette_tv data.download=true with an empty root
  weights no network: model.weights=IMAGENET1K_V1 with an empty torch.hub cache
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE = ["model.name=resnet18", "model.weights=null", "logger=csv", "data.resize=32", "data.crop=32"]
CASES = {
    "baseline": (["data=folder", "data.root=/nonexistent"], {}),
    "hf offline": (["data=imagenette_hf"], {"HF_HUB_OFFLINE": "1"}),
    "hf no network": (["data=imagenette_hf"], {}),
    "tv no network": (["data=imagenette_tv", "data.download=true", "data.root={tmp}/tv"], {}),
    "weights no network": (["data=synthetic", "model.weights=IMAGENET1K_V1"], {}),
}


STEP = """
import sys, time
from hydra import compose, initialize_config_dir
from excitation_pullbacks import build_model
from excitation_pullbacks.pipeline.cli import CONFIG_DIR
from excitation_pullbacks.pipeline.data import build_dataset
with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
    cfg = compose("config", overrides=sys.argv[1:])
start = time.perf_counter()
try:
    build_model(cfg.model.name, cfg.model.weights)
    build_dataset(cfg.data, [0])
except Exception as err:
    print(f"error: {err}", file=sys.stderr)
print(f"{time.perf_counter() - start:.3f}")
"""


def once(overrides: list[str], env: dict, tmp: Path, step: bool = False) -> tuple[float, str]:
    """(seconds, last stderr line) of one ``pullbacks`` run (``step``: of its failing step alone)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    environ.update(HF_HOME=str(tmp / "hf"), TORCH_HOME=str(tmp / "torch"), WANDB_MODE="offline", **env)
    args = [o.format(tmp=tmp) for o in [*BASE, *overrides, f"output_dir={tmp / 'out'}"]]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *(["-c", STEP] if step else ["-m", "excitation_pullbacks.pipeline.cli"]), *args],
        env=environ,
        cwd=tmp,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    seconds = float(proc.stdout.split()[-1]) if step else time.perf_counter() - start
    return seconds, (lines[-1] if lines else f"exit {proc.returncode}, no stderr")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--step", action="store_true", help="time the failing step alone, not the whole command")
    args = p.parse_args()
    print(subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip())
    rows = {}
    for _ in range(args.repeats):  # interleaved, so that load changes hit every case alike
        for name, (overrides, env) in CASES.items():
            with tempfile.TemporaryDirectory() as tmp:
                seconds, line = once(overrides, env, Path(tmp), args.step)
            rows.setdefault(name, ([], line))[0].append(seconds)
    base = statistics.median(rows["baseline"][0])
    print(f"{'case':<20} {'median s':>9} {'minus baseline':>15}  error line")
    for name, (times, line) in rows.items():
        median = statistics.median(times)
        print(f"{name:<20} {median:9.2f} {median - base:15.2f}  {line[:150]}")
    print(subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip())


if __name__ == "__main__":
    main()
