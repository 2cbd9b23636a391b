"""Local checkpoints on the explorer's page: only the files of the folder the operator names at start
(``--checkpoint-dir``) load, every other value gets one message that does not tell whether the path exists,
command lines show no server path outside that folder, and a start beyond localhost warns once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]

from excitation_pullbacks.app.checkpoints import CheckpointRefused, Checkpoints
from excitation_pullbacks.app.cli import cache_sweep, exposure_warning, main, parse_args
from excitation_pullbacks.app.images import digits_folder, list_images
from excitation_pullbacks.app.models import ModelError, ModelSpec
from excitation_pullbacks.app.page import build_demo
from excitation_pullbacks.models import DigitsCNN

from helpers import free_port, serving


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(offered folder, a checkpoint outside it): random digits CNNs saved as state dicts; the folder also holds
    a sub-folder's file and a link to the outside file."""
    base = tmp_path_factory.mktemp("checkpoints")
    offered, outside = base / "offered", base / "outside.pt"
    (offered / "more").mkdir(parents=True)
    for seed, path in ((1, offered / "digits.pt"), (2, offered / "more" / "b.pth"), (3, outside)):
        torch.manual_seed(seed)
        torch.save(DigitsCNN().state_dict(), path)
    (offered / "notes.txt").write_text("not a checkpoint")
    (offered / "link.pt").symlink_to(outside)
    return offered, outside


@pytest.fixture(scope="module")
def served(folders, tmp_path_factory):
    offered, _ = folders
    work = tmp_path_factory.mktemp("work")
    images = digits_folder(tmp_path_factory.mktemp("digits"), per_class=1)
    demo = build_demo(
        ModelSpec("digits_cnn", "DEFAULT"), device="cpu", images=images, work_dir=work, checkpoint_dir=offered
    )
    with serving(demo) as url:
        yield gradio_client.Client(url, verbose=False), list_images(images), work


def test_the_folder_lists_its_checkpoints_and_nothing_else(folders):
    offered, outside = folders
    checkpoints = Checkpoints.offered(offered)
    assert checkpoints.choices() == ["digits.pt", "more/b.pth"]  # no text file, no link leaving the folder
    assert checkpoints.resolve("more/b.pth") == str(offered / "more" / "b.pth")
    assert checkpoints.resolve("") is None and checkpoints.resolve(None) is None
    started = Checkpoints.offered(offered, start=str(outside))  # the operator's start checkpoint, by its name
    assert started.choices() == ["outside.pt", "digits.pt", "more/b.pth"]
    assert started.resolve("outside.pt") == str(outside)
    assert started.public(str(outside)) == "outside.pt" and started.public(str(offered / "digits.pt")) == str(
        offered / "digits.pt"
    )
    with pytest.raises(ModelError, match="is not a folder"):
        Checkpoints.offered(outside)


def test_every_other_value_gets_the_same_message(folders):
    offered, outside = folders
    checkpoints = Checkpoints.offered(offered)
    values = [str(outside), "../outside.pt", "link.pt", "missing.pt", "more", "notes.txt", str(offered / "digits.pt")]
    messages = set()
    for value in values:
        with pytest.raises(CheckpointRefused) as err:
            checkpoints.resolve(value)
        messages.add(str(err.value).replace(repr(value), "VALUE"))
    assert len(messages) == 1, messages
    with pytest.raises(CheckpointRefused):
        Checkpoints.offered().resolve(str(offered / "digits.pt"))  # no folder named: nothing is offered


def test_the_served_page_loads_only_offered_checkpoints(served, folders):
    client, files, work = served
    offered, outside = folders
    status, *_ = client.predict("digits_cnn|null", "more/b.pth", api_name="/load_model")
    assert status.startswith("**digits_cnn: checkpoint b.pth** on cpu")
    answers = set()
    for value in (str(outside), "../outside.pt", "missing.pt", "/etc/passwd", "/no/such/file.pt"):
        with pytest.raises(gradio_client.exceptions.AppError) as err:
            client.predict("digits_cnn|null", value, api_name="/load_model")
        answers.add(str(err.value).replace(repr(value), "VALUE"))
    assert len(answers) == 1 and "is not offered by this explorer" in answers.pop()

    run = ("digits_cnn|null", "digits.pt", gradio_client.handle_file(str(files[3])), "class", "digit 3 (3)")
    run += ("features.6", 2, "", "", "paper", "sigmoid", 0.3, "", False, 2, 2.857, 14.29, "0, 1")
    command = client.predict(*run, api_name="/run")[-1]
    assert f"model.checkpoint={offered / 'digits.pt'}" in command and "data.root=input" in command
    assert str(work) not in command and str(outside) not in command
    exported = client.predict(2, api_name="/export")
    names = {Path(p).name for p in exported}
    assert "0_3.png" in names and "command.txt" in names  # the command runs in the export's folder
    text = Path(next(p for p in exported if p.endswith("command.txt"))).read_text()
    assert str(work) not in text


def test_a_start_beyond_localhost_warns_once(folders, tmp_path):
    assert exposure_warning("127.0.0.1", 7860) is None and exposure_warning("localhost", 7860) is None
    assert exposure_warning("::1", 7860) is None
    assert "beyond this machine" in exposure_warning("0.0.0.0", 7860)
    assert "checkpoint files in /ckpt" in exposure_warning("myhost.example", 7860, "/ckpt")
    offered, _ = folders
    port = free_port()
    cmd = [sys.executable, "-m", "excitation_pullbacks.app.cli", "--host", "0.0.0.0", "--port", str(port)]
    cmd += ["--checkpoint-dir", str(offered), "--images", str(tmp_path)]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False"),
    )
    lines = []
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            lines.append(line)
            if "Running on" in line or time.monotonic() > deadline:
                break
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and f"0.0.0.0:{port}" in warnings[0] and str(offered) in warnings[0], lines


def test_a_checkpoint_dir_that_is_no_folder_is_one_line(folders):
    _, outside = folders
    with pytest.raises(SystemExit, match="error: --checkpoint-dir .*outside.pt is not a folder"):
        main(["--checkpoint-dir", str(outside)])


def test_cache_age_sets_gradios_sweep(capsys):
    """--cache-age N: Gradio deletes cached uploads and results older than N s, sweeping every N / 3 s (the
    default 900 s is the page's own (300, 900)); an age under 1 s is refused by the parser."""
    assert parse_args([]).cache_age == 900 and cache_sweep(900) == (300, 900)
    assert cache_sweep(120) == (40, 120) and cache_sweep(2) == (1, 2)
    with pytest.raises(SystemExit):
        parse_args(["--cache-age", "0"])
    assert "--cache-age must be at least 1 second" in capsys.readouterr().err
