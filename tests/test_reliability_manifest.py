"""Results belong to the config that asked for them: the manifest lists every file with its size and checksum,
another config is refused or written beside, re-runs keep the user's files and redo damaged results."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from excitation_pullbacks.pipeline import PipelineError
from excitation_pullbacks.pipeline.run import run

from helpers import FAST, tiny_cfg


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path (computed here, not by the package)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path):
    final = run(tiny_cfg(tmp_path, *FAST))["results"]
    manifest = json.loads((final / "manifest.json").read_text())
    files = digests(final)
    del files["manifest.json"]
    assert manifest["complete"] is True and set(manifest["files"]) == set(files)
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == files[name] and entry["size"] == (final / name).stat().st_size
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["started"] <= manifest["finished"]
    ident = manifest["identity"]
    assert ident["gate"]["temperature"] == 0.3 and "output_dir" not in ident and "logger" not in ident
    assert "trainer" not in ident and "name" not in ident and "skip_complete" not in ident


def test_another_config_is_refused_or_written_beside(tmp_path, capsys):
    first = run(tiny_cfg(tmp_path, *FAST, "gate.temperature=0.3"))["results"]
    before = digests(first)
    with pytest.raises(PipelineError, match=r"another config \(gate\.temperature: 0\.3 -> 0\.5.*on_conflict=beside"):
        run(tiny_cfg(tmp_path, *FAST, "gate.temperature=0.5"))
    assert digests(first) == before and not (tmp_path / ".results.partial").exists()

    beside = run(tiny_cfg(tmp_path, *FAST, "gate.temperature=0.5", "on_conflict=beside"))
    assert "writing beside it in" in capsys.readouterr().out
    assert beside["results"] != first and beside["results"].name.startswith("results-")
    assert digests(first) == before  # the first results untouched
    t = torch.load(beside["results"] / "tensors.pt", weights_only=True)
    assert t["temperatures"] == ["0.5"]
    again = run(tiny_cfg(tmp_path, *FAST, "gate.temperature=0.5", "on_conflict=beside"))
    assert again["skipped"] and again["results"] == beside["results"]
    assert run(tiny_cfg(tmp_path, *FAST, "gate.temperature=0.3"))["skipped"]


def test_rerun_keeps_user_files_and_redoes_damaged_results(tmp_path, capsys):
    first = run(tiny_cfg(tmp_path, *FAST))["results"]
    # keys that do not change results: still complete
    assert run(tiny_cfg(tmp_path, *FAST[:1], "logger=csv", "name=renamed", "trainer.devices=1"))["skipped"]
    (first / "notes.txt").write_text("mine")
    (first / "mine").mkdir()
    (first / "mine" / "plot.png").write_bytes(b"user data")
    old = json.loads((first / "manifest.json").read_text())

    rerun = run(tiny_cfg(tmp_path, *FAST, "skip_complete=false"))
    assert not rerun["skipped"] and sorted(rerun["kept"]) == ["mine/plot.png", "notes.txt"]
    assert "kept 2 file(s)" in capsys.readouterr().out
    assert (first / "notes.txt").read_text() == "mine" and (first / "mine" / "plot.png").read_bytes() == b"user data"
    new = json.loads((first / "manifest.json").read_text())
    assert new["finished"] >= old["finished"] and "notes.txt" not in new["files"]
    assert not list(tmp_path.glob(".*.partial"))

    (first / "tensors.pt").write_bytes(b"damaged")  # a listed file changed: no longer complete
    again = run(tiny_cfg(tmp_path, *FAST))
    assert not again["skipped"] and torch.load(first / "tensors.pt", weights_only=True)["temperatures"] == ["0.3"]
    assert (first / "notes.txt").read_text() == "mine"


def test_a_results_folder_without_manifest_is_not_complete(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "mine.txt").write_text("x")
    result = run(tiny_cfg(tmp_path, *FAST))
    assert not result["skipped"] and (tmp_path / "results" / "fig2.png").is_file()
    assert (tmp_path / "results" / "mine.txt").read_text() == "x"


def test_files_no_manifest_lists_are_never_overwritten(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "config.yaml").write_text("the user's")
    with pytest.raises(PipelineError, match="no manifest lists .* config.yaml"):
        run(tiny_cfg(tmp_path, *FAST))
    assert (tmp_path / "results" / "config.yaml").read_text() == "the user's"
    assert not (tmp_path / ".results.partial").exists()
