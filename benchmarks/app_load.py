"""The explorer under load: ``pullbacks-app`` started on a local port (its own process), N gradio_client clients
sending R /run + /export requests each at once, every one a different image, target and temperature, and each
result compared with ``pullback`` called directly (the excitation panel's PNG pixel for pixel, the exported
tensor bit for bit); then a client that goes away in the middle of a long run, and the next client's wait.

Run: PYTHONPATH=src .venv/bin/python benchmarks/app_load.py [--clients 8] [--requests 25] [--model digits_cnn]
[--cache-age 900]
Prints: clients, requests, errors, /run latency p50/p90/p99, server RSS after the warm-up, at each tenth of the
requests (with the time) and at the end, the files and bytes left in the server's temporary folders, and the
disconnect test's numbers.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from gradio_client import Client, handle_file
from PIL import Image

from excitation_pullbacks import pullback
from excitation_pullbacks.app.images import digits_folder, list_images, open_image, preprocess
from excitation_pullbacks.app.inputs import rules_gate
from excitation_pullbacks.app.models import ModelSpec, load_model
from excitation_pullbacks.app.panels import render_map

#: /run's method panel at its defaults (soft_pullback), and a long FusionPullback for the disconnect test.
METHOD = ("soft_pullback", False, 5, 2.857, True, 10, 0.15, 10, 0.1, 0)
LONG = ("fusion_pullback", False, 5, 2.857, True, 200, 0.15, 50, 0.1, 0)


def run_args(key: str, layer: str, path: Path, target: str, temperature: float, method=METHOD) -> tuple:
    """/run's values by position: paper rules with a sigmoid gate at ``temperature``, 1 ascent step, one strip T."""
    head = (key, "", handle_file(str(path)), "class", target, layer, 0, "", "", "paper", "sigmoid", temperature)
    return (*head, "", False, 1, 2.857, 14.29, "0.3", *method)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def disk(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=25, help="per client")
    p.add_argument("--model", default="digits_cnn")
    p.add_argument("--weights", default="DEFAULT")
    p.add_argument(
        "--cache-age", type=int, default=900, help="the server's --cache-age (shorter: its cache sweep within the run)"
    )
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="app-load-"))
    images = digits_folder(base / "images", per_class=5)
    files = list_images(images)
    spec = ModelSpec(args.model, None if args.weights.lower() in ("null", "none") else args.weights)
    loaded = load_model(spec, "cpu")
    names = [f"{c} ({i})" for i, c in enumerate(loaded.classes)]

    rng = random.Random(0)
    n = args.clients * args.requests
    plan = [(rng.randrange(len(files)), rng.randrange(len(names)), round(rng.uniform(0.1, 2.0), 2)) for _ in range(n)]
    expected = []
    for f, t, temp in plan:
        x = preprocess(open_image(files[f]), loaded.resize, loaded.crop)
        expected.append(pullback(loaded.model, x, t, rules_gate("paper", "sigmoid", temp, "", False)))

    server_tmp = base / "server-tmp"
    server_tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(server_tmp), GRADIO_TEMP_DIR=str(server_tmp / "gradio"))
    port = free_port()
    cmd = [sys.executable, "-m", "excitation_pullbacks.app.cli", "--model", args.model, "--weights", args.weights]
    cmd += ["--images", str(images), "--port", str(port), "--device", "cpu", "--cache-age", str(args.cache_age)]
    log = base / "server.log"  # a file, not a pipe: a pipe nobody reads would stall a server that logs much
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"), text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"error: the app did not start: {log.read_text()[-2000:]}")
                time.sleep(0.5)
        key, layer = f"{spec.name}|{spec.weights}", loaded.layers[0]
        warm = Client(url, verbose=False)
        for i in range(args.clients):  # warm-up: the first requests of a fresh server
            warm.predict(*run_args(key, layer, files[i], names[0], 0.3), api_name="/run")
            warm.predict(1, api_name="/export")
        rss_before = rss_mb(server.pid)
        latencies, errors, wrong, lock = [], [], [], threading.Lock()

        def client_loop(k: int) -> None:
            client = Client(url, verbose=False)
            for r in range(args.requests):
                i = k * args.requests + r
                f, t, temp = plan[i]
                try:
                    start = time.perf_counter()
                    out = client.predict(*run_args(key, layer, files[f], names[t], temp), api_name="/run")
                    took = time.perf_counter() - start
                    exported = client.predict(1, api_name="/export")
                    saved = torch.load(next(q for q in exported if q.endswith("tensors.pt")), weights_only=True)
                    same = np.array_equal(png(out[3]), np.asarray(render_map(expected[i][0])))
                    same = same and torch.equal(saved["excitation"], expected[i])
                    with lock:
                        latencies.append(took)
                        if not same:
                            wrong.append(i)
                except Exception as err:  # noqa: BLE001 - counted and reported
                    with lock:
                        errors.append(f"request {i}: {type(err).__name__}: {' '.join(str(err).split())[:200]}")

        samples, running = [], threading.Event()
        start = time.perf_counter()

        def watch() -> None:  # the server's RSS against the requests answered and the time, every half second
            while not running.wait(0.5):
                with lock:
                    done = len(latencies) + len(errors)
                samples.append((done, rss_mb(server.pid), time.perf_counter() - start))

        watcher = threading.Thread(target=watch)
        watcher.start()
        threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        running.set()
        watcher.join()
        rss_after = rss_mb(server.pid)
        work_files, work_bytes = disk(next(server_tmp.glob("pullbacks-app-*")))
        cache_files, cache_bytes = disk(server_tmp / "gradio")
        p50, p90, p99 = np.percentile(latencies, [50, 90, 99]) if latencies else (float("nan"),) * 3
        print(f"model {spec.label}, torch {torch.__version__}, {os.cpu_count()} CPUs")
        print(f"load: {subprocess.run(['uptime'], capture_output=True, text=True, check=True).stdout.strip()}")
        print(f"clients {args.clients}, requests {n} (/run + /export each), wall {wall:.1f} s")
        print(f"errors {len(errors)}, results not equal to pullback {len(wrong)}")
        for line in errors[:5]:
            print(f"  {line}")
        print(f"/run latency (queued, {args.clients} clients): p50 {p50:.2f} s, p90 {p90:.2f} s, p99 {p99:.2f} s")
        print(f"server RSS: {rss_before:.0f} MB after warm-up, {rss_after:.0f} MB after {n} requests")
        tenths = [
            next(((mb, at) for done, mb, at in samples if done >= q * n // 10), (rss_after, wall)) for q in range(1, 11)
        ]
        print(
            "server RSS at each tenth of the requests (MB @ s): "
            + ", ".join(f"{mb:.0f} @ {at:.0f}" for mb, at in tenths)
        )
        print(
            f"server files: work folder (runs, exports; newest 64 kept) {work_files} files, {work_bytes / 1e6:.1f} MB; "
            f"Gradio cache (uploads, results; swept by age) {cache_files} files, {cache_bytes / 1e6:.1f} MB"
        )

        gone = Client(url, verbose=False)
        job = gone.submit(*run_args(key, layer, files[0], names[0], 0.3, LONG), api_name="/run")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            progress = job.status().progress_data
            if progress and str(progress[0].desc).startswith("method"):
                break
            time.sleep(0.1)
        time.sleep(1.0)
        gone.close()
        start = time.perf_counter()
        nxt = Client(url, verbose=False)
        out = nxt.predict(*run_args(key, layer, files[1], names[1], 0.3), api_name="/run")
        waited = time.perf_counter() - start
        x = preprocess(open_image(files[1]), loaded.resize, loaded.crop)
        right = np.array_equal(
            png(out[3]),
            np.asarray(render_map(pullback(loaded.model, x, 1, rules_gate("paper", "sigmoid", 0.3, "", False))[0])),
        )
        print(
            f"disconnect: a client closed 1 s into a {LONG[7]} x {LONG[5]} FusionPullback run; the next client's "
            f"run answered in {waited:.1f} s (correct: {right}); server alive: {server.poll() is None}"
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
        text = log.read_text(errors="replace")
        errors_logged = [line for line in text.splitlines() if re.match(r"^\w*(Error|Exception)\b", line)]
        print(
            f"server log: {text.count('Traceback')} tracebacks"
            + (f"; last: {errors_logged[-1]}" if errors_logged else "")
        )


if __name__ == "__main__":
    main()
