"""Helpers shared by the test modules: the torchvision architectures and their call counts, one check that a
model is left exactly as it was, tiny pipeline configs, running the CLI, output checks, serving the explorer."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from torch import nn

from excitation_pullbacks.pipeline.cli import CONFIG_DIR, main
from excitation_pullbacks.pipeline.dashboard import run_records

ARCHS = ["resnet50", "vgg11_bn", "densenet121"]
# (ReLU, max-pool) calls per forward pass that a complete implementation gates: ResNet50 reuses Bottleneck.relu
# three times; DenseNet121 has 120 ReLU modules plus the functional F.relu in DenseNet.forward.
EXPECTED_CALLS = {"resnet50": (49, 1), "vgg11_bn": (10, 5), "densenet121": (121, 1)}


def model_state(model: nn.Module) -> dict:
    """Everything a gating context or a pullback could leave changed in ``model`` (and in torch)."""
    return {
        "modules": [(n, id(m)) for n, m in model.named_modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "flags": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "inplace": [getattr(m, "inplace", None) for m in model.modules()],
        "hooks": sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
        ),
        "modes": torch._C._len_torch_function_stack(),
    }


def assert_model_unchanged(model: nn.Module, before: dict) -> None:
    """Assert ``model`` is as :func:`model_state` recorded it in ``before``, and holds no hooks at all."""
    after = model_state(model)
    assert after["hooks"] == 0, "hooks left on the model"
    assert {k: v for k, v in after.items() if k != "state"} == {k: v for k, v in before.items() if k != "state"}
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], before["state"][k]) for k in before["state"])


#: A run small enough for 2 CPU cores: random-weight ResNet18 on six 32 x 32 synthetic images, two classes.
TINY = [
    "model.name=resnet18",
    "model.weights=null",
    "data=synthetic",
    "data.num_images=6",
    "data.crop=32",
    "data.resize=32",
    "targets=custom",
    "targets.rows=[tench,church]",
    "targets.extra=[]",
    "logger=csv",
]
#: Two CPU processes in one pytest process (plain ddp would relaunch the command line, i.e. pytest).
DDP_SPAWN = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp_spawn"]
CLI = [sys.executable, "-m", "excitation_pullbacks.pipeline.cli"]


#: The quickest figures run (Fig. 2, no logger) for tests of the run skeleton.
FAST = ("experiment=fig2", "logger=none")


def tiny_overrides(*overrides: str) -> list[str]:
    """TINY followed by ``overrides``; another data source replaces the synthetic one."""
    base = TINY
    if any(o.startswith("data=") for o in overrides):
        base = [o for o in TINY if not o.startswith(("data=", "data.num_images"))]
    return [*base, *overrides]


def compose_config(*overrides: str):
    """The packaged config composed with ``overrides`` (Hydra's compose API, as the CLI composes it)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose("config", overrides=list(overrides))


def tiny_cfg(tmp_path: Path, *overrides: str):
    """A tiny run writing to ``tmp_path``."""
    return compose_config(*tiny_overrides(f"output_dir={tmp_path}", *overrides))


def cli(tmp_path: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``pullbacks`` in a subprocess (cwd ``tmp_path``) with the tiny overrides: for what needs a fresh
    process (DDP relaunching the command line, environment read at import, W&B's service)."""
    environ = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", **(env or {}))
    flags = [o for o in overrides if o.startswith("-")]
    overrides = tuple(o for o in overrides if not o.startswith("-"))
    return subprocess.run(
        [*CLI, *flags, *tiny_overrides(*overrides)],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def cli_in_process(monkeypatch, capsys, tmp_path: Path, *overrides: str) -> tuple[int, str, str]:
    """The console entry point called in this process (cwd ``tmp_path``) with the tiny overrides
    -> (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    flags = [o for o in overrides if o.startswith("-")]
    overrides = tuple(o for o in overrides if not o.startswith("-"))
    monkeypatch.setattr(sys, "argv", ["pullbacks", *flags, *tiny_overrides(*overrides)])
    with pytest.raises(SystemExit) as exit_info:
        main()
        sys.exit(0)
    out = capsys.readouterr()
    code = exit_info.value.code
    return (0 if code is None else code), out.out, out.err


def assert_one_error_line(returncode: int, stderr: str, *fragments: str) -> None:
    """A non-zero exit with exactly one stderr line, ``error: ...``, holding every fragment."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0]


def assert_nothing_written(out: Path) -> None:
    assert not (out / "results").exists() and not (out / ".results.partial").exists()


#: Real Imagenette photos, one per class, named <Imagenette label>_<class>.jpg (used when this folder exists).
PHOTOS = Path(os.environ.get("EP_TEST_PHOTOS", "/work/shared/data/imagenette-samples"))
#: frgfm/imagenette's label names (its ClassLabel), Imagenette's order: sorted WordNet ids.
IMAGENETTE_NAMES = [
    "tench",
    "English springer",
    "cassette player",
    "chain saw",
    "church",
    "French horn",
    "garbage truck",
    "gas pump",
    "golf ball",
    "parachute",
]


def imagenette_photos() -> list[bytes]:
    """JPEG files' bytes, one per Imagenette class (label order): the real photos of :data:`PHOTOS` when present,
    else seeded noise images saved as JPEG."""
    if PHOTOS.is_dir():
        files = sorted(PHOTOS.glob("*.jpg"), key=lambda p: int(p.name.split("_")[0]))
        if len(files) == 10:
            return [f.read_bytes() for f in files]
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(10):
        buf = io.BytesIO()
        Image.fromarray((torch.rand(120, 160, 3, generator=g) * 255).byte().numpy()).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out


def read_rows(path: Path) -> list[dict]:
    """A CSV file's rows as dicts."""
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------------------------
# The records W&B itself wrote: an offline run's ``run-<id>.wandb`` file, read back (the pipeline's reader).


def wandb_records(run_dir: Path) -> list:
    """Every Record in the ``*.wandb`` file of an offline run folder, in order."""
    (path,) = Path(run_dir).glob("*.wandb")
    return run_records(path)


def _items(items) -> dict:
    """Summary or history items (nested keys joined by '/') -> {key: value}."""
    out = {}
    for item in items:
        key = "/".join(item.nested_key) if item.nested_key else item.key
        out[key] = json.loads(item.value_json)
    return out


@dataclass
class WandbRun:
    """What an offline W&B run recorded: the run record (name, group, job_type, tags, notes, config), the
    final summary, the history rows, the defined metrics, the exit code, its stats records and folder."""

    folder: Path
    run: object = None
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    metrics: list = field(default_factory=list)
    exit_code: int | None = None
    stats: int = 0

    def table(self, key: str) -> tuple[list, list]:
        """(columns, rows) of a logged wandb.Table, read from the file the run saved."""
        ref = self.summary[f"{key}/path"]
        data = json.loads((self.folder / "files" / ref).read_text())
        return data["columns"], data["data"]


def read_wandb_run(folder: Path, timeout: float = 60.0) -> WandbRun:
    """The records of the finished offline run in ``folder`` (``offline-run-*``). W&B's service may still be
    writing the file when ``finish`` returns: wait (up to ``timeout`` s) for its exit record."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = wandb_records(folder)
        except ValueError:  # read while the service writes it
            if time.monotonic() >= deadline:
                raise
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    got = WandbRun(Path(folder))
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            got.run = r.run
            got.config = {u.key: json.loads(u.value_json) for u in r.run.config.update}
        elif kind == "summary":
            got.summary.update(_items(r.summary.update))
        elif kind == "history":
            got.history.append(_items(r.history.item))
        elif kind == "metric":
            got.metrics.append(r.metric)
        elif kind == "exit":
            got.exit_code = r.exit.exit_code
        elif kind == "stats":
            got.stats += 1
        elif kind == "config":
            got.config.update({u.key: json.loads(u.value_json) for u in r.config.update})
    return got


# --- the explorer served on a local port ---------------------------------------------------------------


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(demo) -> Iterator[str]:
    """Serve the Gradio Blocks ``demo`` on a free local port; yields its URL, closes it after."""
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, show_error=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
