"""The served explorer under load and misuse: concurrent gradio_client clients each get their own correct
result (equal to ``pullback`` called directly), a client that goes away mid-run does not hold up the queue,
bad uploads are one-line messages while the server keeps serving, and disk use stays bounded."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]

from excitation_pullbacks import pullback
from excitation_pullbacks.app.images import digits_folder, list_images, open_image, preprocess
from excitation_pullbacks.app.inputs import rules_gate
from excitation_pullbacks.app.models import ModelSpec, load_model
from excitation_pullbacks.app.page import build_demo
from excitation_pullbacks.app.panels import render_map

from helpers import free_port

SPEC = ModelSpec("digits_cnn", "DEFAULT")
KEEP = 3


def run_args(path, target: int, temperature: float = 0.3, method=("soft_pullback", False, 5, 2.857, True, 10, 0.15)):
    """/run's values by position (digits CNN, paper rules with a sigmoid gate at ``temperature``, 1 ascent step,
    one strip temperature, a method); the method's remaining settings at their defaults."""
    head = ("digits_cnn|DEFAULT", "", gradio_client.handle_file(str(path)), "class", f"digit {target} ({target})")
    gate = ("features.6", 0, "", "", "paper", "sigmoid", temperature, "", False)
    return (*head, *gate, 1, 2.857, 14.29, "0.3", *method, 10, 0.1, 0)


def expected_map(path, target: int, temperature: float) -> torch.Tensor:
    loaded = load_model(SPEC, "cpu")
    x = preprocess(open_image(path), loaded.resize, loaded.crop)
    return pullback(loaded.model, x, target, rules_gate("paper", "sigmoid", temperature, "", False))


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@contextmanager
def serve(tmp_path_factory, **options):
    """The explorer served as ``pullbacks-app`` serves it (with a 1 MB upload limit) and ``options`` of
    build_demo: (url, the page, its work folder, one image per digit)."""
    folder = digits_folder(tmp_path_factory.mktemp("digits"), per_class=1)
    work = tmp_path_factory.mktemp("work")
    demo = build_demo(SPEC, device="cpu", images=folder, work_dir=work, **options)
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, max_file_size="1mb")
    try:
        yield f"http://127.0.0.1:{port}/", demo, work, list_images(folder)
    finally:
        demo.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with serve(tmp_path_factory) as page:
        yield page


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A page that keeps KEEP folders of runs and exports and sweeps Gradio's cache of files older than 5 s
    every second."""
    with serve(tmp_path_factory, keep=KEEP, delete_cache=(1, 5)) as page:
        yield page


def test_concurrent_clients_get_their_own_results(served):
    """4 clients x 3 requests at once, each a different image, target and T: each panel and export is its own
    request's pullback, bit for bit."""
    url, _, _, files = served
    failures, done = [], []
    requests = {
        (k, r): ((k + 3 * r) % 10, (k + r + 1) % 10, 0.2 + 0.1 * k + 0.5 * r) for k in range(4) for r in range(3)
    }
    # computed before the clients start: the server shares this process's (cached) model
    expect = {kr: expected_map(files[d], t, temp) for kr, (d, t, temp) in requests.items()}

    def client_loop(k: int) -> None:
        try:
            client = gradio_client.Client(url, verbose=False)
            for r in range(3):
                digit, target, temperature = requests[k, r]
                out = client.predict(*run_args(files[digit], target, temperature), api_name="/run")
                expected = expect[k, r]
                assert np.array_equal(png(out[3]), np.asarray(render_map(expected[0]))), (k, r)
                saved = torch.load(
                    next(p for p in client.predict(1, api_name="/export") if p.endswith("tensors.pt")),
                    weights_only=True,
                )
                assert torch.equal(saved["excitation"], expected), (k, r)
                done.append((k, r))
        except Exception as err:  # noqa: BLE001 - reported below with its client
            failures.append(f"client {k}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not failures and len(done) == 12


def test_a_client_gone_mid_run_does_not_hold_the_queue(served):
    """A long fusion run (2500 pullbacks, minutes) whose client closes: the next client's run is served in
    seconds, and the server goes on serving."""
    url, _, _, files = served
    gone = gradio_client.Client(url, verbose=False)
    long_method = ("fusion_pullback", False, 5, 2.857, True, 50, 0.15)
    job = gone.submit(*run_args(files[0], 0, method=long_method)[:-3], 50, 0.1, 0, api_name="/run")
    deadline = time.monotonic() + 60
    while not running(job, "method") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running(job, "method")
    time.sleep(1.0)
    gone.close()
    start = time.monotonic()
    client = gradio_client.Client(url, verbose=False)
    out = client.predict(*run_args(files[1], 1), api_name="/run")
    waited = time.monotonic() - start
    assert np.array_equal(png(out[3]), np.asarray(render_map(expected_map(files[1], 1, 0.3)[0])))
    assert waited < 20, f"the next run waited {waited:.1f} s"


def running(job, what: str) -> bool:
    """Whether the job reports progress in its piece of work ``what``."""
    progress = job.status().progress_data
    return bool(progress) and str(progress[0].desc).startswith(what)


def write_bad(kind: str, folder: Path) -> Path:
    path = folder / {"gif": "anim.gif", "text": "photo.png"}.get(kind, f"{kind}.png")
    if kind == "text":
        path.write_bytes(b"this is not an image")
    elif kind == "tiny":
        Image.new("RGB", (1, 1), (200, 10, 10)).save(path)
    elif kind == "huge":
        Image.new("L", (8000, 6250)).save(path)  # 50 megapixels, a small file
    elif kind == "deep":
        Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)).save(path)
    elif kind == "gif":
        frames = [Image.new("RGB", (40, 40), (80 * i, 0, 200)) for i in range(3)]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    elif kind == "big":
        path.write_bytes(np.random.default_rng(0).bytes(2_000_000))
    return path


#: Each bad upload and the message the page shows (an error, or the input note for images it can read).
BAD_UPLOADS = [
    ("text", "error", "cannot read image photo.png: not an image file PIL can identify"),
    ("tiny", "error", "image tiny.png is 1 x 1 pixels: too small, give one at least 8 x 8"),
    ("huge", "error", "image huge.png is too large: 8000 x 6250 = 50000000 pixels, over the limit of 40000000"),
    ("big", "error", "exceeds the maximum file size of 1048576 bytes"),
    ("deep", "note", "Input deep.png: 32 x 32, mode I;16 (16-bit, read by its value range: / 65535)"),
    ("gif", "note", "Input anim.gif: 40 x 40, mode P; 3 frames: the first is used"),
]


@pytest.mark.parametrize(("kind", "shows", "message"), BAD_UPLOADS, ids=[b[0] for b in BAD_UPLOADS])
def test_bad_uploads_are_one_line_and_the_server_keeps_serving(served, tmp_path, kind, shows, message):
    url, _, _, files = served
    client = gradio_client.Client(url, verbose=False)
    path = write_bad(kind, tmp_path)
    if shows == "error":
        with pytest.raises((gradio_client.exceptions.AppError, ValueError)) as err:
            client.predict(*run_args(path, 3), api_name="/run")
        text = str(err.value)
        assert message in text and "\n" not in text.strip(), text
        assert kind == "big" or str(tmp_path) not in text  # no server path (the client names its own file)
    else:
        out = client.predict(*run_args(path, 3), api_name="/run")
        assert out[0].startswith(message), out[0]
        expected = expected_map(path, 3, 0.3)
        assert np.array_equal(png(out[3]), np.asarray(render_map(expected[0])))
    if kind == "big":  # the server refuses it too, not only the client
        with path.open("rb") as f:
            answer = httpx.post(f"{url}gradio_api/upload", files={"files": (path.name, f, "image/png")})
        assert answer.status_code == 413 and "exceeded maximum allowed size of 1048576 bytes" in answer.text
    ok = client.predict(*run_args(files[2], 2), api_name="/run")
    assert Path(ok[3]).is_file()


def cached(demo) -> set[Path]:
    """The files Gradio keeps for the page (uploads, results) that are on disk."""
    for _ in range(10):
        try:
            return {Path(f) for s in list(demo.temp_file_sets) for f in list(s) if Path(f).exists()}
        except RuntimeError:  # a set changed while read: read again
            time.sleep(0.05)
    raise AssertionError("Gradio's file sets kept changing")


def test_disk_use_is_bounded(swept):
    """Many runs and exports leave at most KEEP folders of each (and of the runs' panels) in the work folder,
    and Gradio's cache of uploads and results is swept (delete_cache) down to the gallery's examples."""
    url, demo, work, files = swept
    client = gradio_client.Client(url, verbose=False)
    for i in range(KEEP + 4):
        client.predict(*run_args(files[i % 10], i % 10), api_name="/run")
        client.predict(1, api_name="/export")
    assert len(list((work / "runs").iterdir())) == KEEP
    assert len(list((work / "exports").iterdir())) == KEEP
    assert len(list((work / "panels").iterdir())) == KEEP  # the panels' PNG files, handed to Gradio as files
    produced = cached(demo)
    assert len(produced) >= 10  # panels, exported files, uploads (older ones may be swept already)
    time.sleep(8)
    kept = cached(demo)
    assert len(kept) <= 10, sorted(kept)  # the gallery's examples at most
