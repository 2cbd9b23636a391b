"""A run's identity and the manifest that makes a ``results`` folder trustworthy.

The **identity** of a run is its resolved config without the keys that do not change the numbers it
writes (:data:`NOT_IDENTITY`: where results go, loggers, trainer placement, the run's name, skip / conflict /
debug switches, Hydra's own settings); its sha256 is the **config hash**. Every published ``results/`` holds
``manifest.json``: the hash and the identity, package and torch versions, start and end time, and every file
the run wrote with its size and sha256. A folder is complete only when its manifest is there, says
``complete``, and every listed file is present with that size and checksum; its files (and only those) are
the tool's - everything else in the folder is the user's and is never removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from .atomic import write_text

__all__ = [
    "MANIFEST",
    "NOT_IDENTITY",
    "Verdict",
    "config_hash",
    "differing_keys",
    "examine",
    "file_digest",
    "identity",
    "listed_files",
    "make_manifest",
    "read_manifest",
    "write_manifest",
]

MANIFEST = "manifest.json"
FORMAT = 1
#: Top-level config keys that do not change a run's results.
NOT_IDENTITY = frozenset({"output_dir", "logger", "trainer", "name", "skip_complete", "on_conflict", "debug", "hydra"})


#: Nested keys that do not change a run's results: (section, key).
NOT_IDENTITY_NESTED = frozenset({("train", "resume_signals")})


def identity(resolved: dict) -> dict:
    """The resolved config without :data:`NOT_IDENTITY` and :data:`NOT_IDENTITY_NESTED` keys."""
    out = {k: v for k, v in resolved.items() if k not in NOT_IDENTITY}
    for section, key in NOT_IDENTITY_NESTED:
        if isinstance(out.get(section), dict) and key in out[section]:
            out[section] = {k: v for k, v in out[section].items() if k != key}
    return out


def config_hash(ident: dict) -> str:
    """sha256 (hex) of the identity as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(ident, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _flatten(d, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): d}


def differing_keys(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two identities, as ``key: old -> new`` (sorted; a key one
    side lacks shows ``(none)``)."""
    a, b = _flatten(old), _flatten(new)
    none = "(none)"
    return [
        f"{k}: {json.dumps(a.get(k, none))} -> {json.dumps(b.get(k, none))}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k, none) != b.get(k, none)
    ]


def file_digest(path: Path) -> dict:
    """{"size": bytes, "sha256": hex} of one file, read in 1 MiB blocks; {"link": target} of a symbolic link
    (W&B links its service log from outside the run, a file that keeps growing: the link is what the run
    wrote)."""
    if path.is_symlink():
        return {"link": os.readlink(path)}
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def listed_files(folder: Path) -> list[str]:
    """Every file under ``folder`` as a POSIX path relative to it (sorted), the manifest excepted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def make_manifest(folder: Path, ident: dict, started: float, *, complete: bool = True, files=None) -> dict:
    """The manifest of ``folder``: every file in it (or ``files``, names only, for an unfinished one) with
    size and sha256. started: the run's start (time.time())."""
    names = listed_files(folder) if files is None else sorted(files)
    return {
        "format": FORMAT,
        "complete": complete,
        "config_hash": config_hash(ident),
        "identity": ident,
        "versions": {
            "excitation_pullbacks": _version("excitation-pullbacks"),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "started": _iso(started),
        "finished": _iso(time.time()),
        "files": {n: (file_digest(folder / n) if files is None else None) for n in names},
    }


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


def write_manifest(folder: Path, manifest: dict) -> Path:
    """Write ``folder/manifest.json`` atomically (a temporary file, fsync, rename)."""
    return write_text(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n", sync=True)


def read_manifest(folder: Path) -> dict | None:
    """The manifest of ``folder``, or None when it is missing or unreadable."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and isinstance(data.get("files"), dict) and "config_hash" in data
    return data if ok else None


@dataclass
class Verdict:
    """What a results folder holds for a config: ``state`` is ``absent`` (no folder), ``complete``,
    ``conflict`` (complete or not, a manifest of another config: ``differences`` lists the keys) or
    ``incomplete`` (no manifest, an unfinished one, or a listed file missing or changed: ``detail`` says
    which). ``ours``: the files a manifest lists (the tool's); ``foreign``: the folder's other files."""

    state: str
    detail: str = ""
    differences: list[str] = field(default_factory=list)
    ours: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)


def examine(final: Path, ident: dict) -> Verdict:
    """Check ``final`` against the config identity ``ident`` (see :class:`Verdict`)."""
    if not final.is_dir():
        return Verdict("absent")
    manifest = read_manifest(final)
    present = listed_files(final)
    if manifest is None:
        detail = "no manifest" if not (final / MANIFEST).exists() else "unreadable manifest"
        return Verdict("incomplete", detail, foreign=present)
    ours = sorted(manifest["files"])
    foreign = [p for p in present if p not in manifest["files"]]
    if manifest["config_hash"] != config_hash(ident):
        return Verdict("conflict", differences=differing_keys(manifest.get("identity") or {}, ident), ours=ours)
    if not manifest.get("complete", False):
        return Verdict("incomplete", "an unfinished publication", ours=ours, foreign=foreign)
    for name, want in manifest["files"].items():
        path = final / name
        if not (path.is_symlink() or path.is_file()):
            return Verdict("incomplete", f"{name} is missing", ours=ours, foreign=foreign)
        if want is None or (not path.is_symlink() and path.stat().st_size != want.get("size")):
            return Verdict("incomplete", f"{name} was changed", ours=ours, foreign=foreign)
        if file_digest(path) != want:
            return Verdict("incomplete", f"{name} was changed", ours=ours, foreign=foreign)
    return Verdict("complete", ours=ours, foreign=foreign)
