"""The sweep of Gradio's cache (app.cache): old files go, components' kept files stay, and a file set that
grows while it is swept (concurrent requests) neither stops the sweep nor loses a file."""

from __future__ import annotations

import os
import threading
import time

import pytest

gr = pytest.importorskip("gradio")

from excitation_pullbacks.app.cache import start_sweeping, sweep

from helpers import free_port


def _files(folder, n, start=0):
    paths = []
    for i in range(start, start + n):
        path = folder / f"{i}.png"
        path.write_bytes(b"x")
        paths.append(str(path))
    return paths


def test_sweep_removes_old_files_and_keeps_kept_ones(tmp_path):
    with gr.Blocks() as demo:
        image = gr.Image()
    files = set(_files(tmp_path, 20))
    demo.temp_file_sets.append(files)
    kept = min(files)
    image.keep_in_cache = {kept}
    assert sweep(demo, age=3600) == 0 and len(files) == 20  # none old enough
    assert sweep(demo, age=-1) == 19
    assert files == {kept} and os.path.exists(kept) and len(list(tmp_path.iterdir())) == 1


def test_sweep_survives_a_set_growing_meanwhile(tmp_path):
    with gr.Blocks() as demo:
        gr.Image()
    files = set(_files(tmp_path, 3000))
    demo.temp_file_sets.append(files)
    old = set(files)
    new = _files(tmp_path, 3000, start=3000)
    done = threading.Event()

    def add() -> None:  # another request's results, arriving during the sweep
        for path in new:
            files.add(path)
        done.set()

    adder = threading.Thread(target=add)
    adder.start()
    removed = sweep(demo, age=-1)
    adder.join()
    assert done.is_set() and removed >= len(old)
    assert not any(os.path.exists(p) for p in old) and not (old & files)
    assert all(os.path.exists(p) == (p in files) for p in new)  # every new file is swept or still listed


def test_start_sweeping_runs_while_the_page_serves(tmp_path):
    with gr.Blocks() as demo:
        gr.Image()
    files = set(_files(tmp_path, 5))
    demo.temp_file_sets.append(files)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    try:
        thread = start_sweeping(demo, frequency=0.05, age=-1)
        deadline = time.monotonic() + 10
        while files and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not files and not list(tmp_path.iterdir())
    finally:
        demo.close()
    thread.join(timeout=10)
    assert not thread.is_alive()
