"""The explorer page (Gradio Blocks): the components of :mod:`.layout` wired to the handlers of :mod:`.events`.

Endpoints (also for ``gradio_client``): ``/load_model``, ``/pick_image``, ``/pick_rules``, ``/run``, ``/step``,
``/export``, ``/stop``. The computations live in :mod:`.panels`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import gradio as gr

from .cache import start_sweeping
from .checkpoints import Checkpoints
from .events import Events
from .images import list_images
from .layout import build_layout
from .models import MODEL_OPTIONS, ModelSpec, load_model

__all__ = ["build_demo"]


def build_demo(
    initial: ModelSpec = MODEL_OPTIONS[0],
    *,
    device: str = "auto",
    images: str | os.PathLike | None = None,
    work_dir: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    keep: int = 64,
    delete_cache: tuple[int, int] | None = (300, 900),
) -> gr.Blocks:
    """The explorer page, with ``initial`` loaded (and cached) and the folder ``images`` in the gallery.

    device: where models run (auto: cuda when available). work_dir: where runs save their input image, panels and
    exports (default: a new temporary folder). checkpoint_dir: the folder whose checkpoint files the page offers
    (None: none; ``initial``'s own checkpoint is offered either way). keep: how many folders of each (runs, panels,
    exports) stay in work_dir (the oldest beyond go). delete_cache: (frequency, age) in seconds: every ``frequency``
    s Gradio's cached uploads and results older than ``age`` s are deleted (None: kept until the server stops;
    :mod:`.cache`). Raises ModelError for a model that cannot be loaded or a checkpoint_dir that is no folder.

    Uploads are limited in size by ``launch(max_file_size=...)`` (``pullbacks-app``: :data:`.cli.MAX_FILE_SIZE`),
    images in pixels by :data:`.images.MAX_PIXELS`. Gradio's per-event analytics (its monitoring dashboard) are
    off: :func:`_without_analytics`.
    """
    checkpoints = Checkpoints.offered(checkpoint_dir, initial.checkpoint)
    loaded = load_model(initial, device)
    options = list(MODEL_OPTIONS)
    if initial not in options:
        options.insert(0, initial)
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="pullbacks-app-"))
    work.mkdir(parents=True, exist_ok=True)
    gallery = [str(p) for p in list_images(images)]
    # Gradio's own delete_cache only for its clean-up at shutdown: its periodic sweep (due after 10^9 s here)
    # swept nothing under concurrent requests (measured), and .cache sweeps instead
    shutdown_only = None if delete_cache is None else (10**9, delete_cache[1])
    with gr.Blocks(title="Excitation pullbacks explorer", delete_cache=shutdown_only) as demo:
        ui = build_layout(
            initial, options, loaded, gallery, checkpoints.choices(), checkpoints.shown(initial.checkpoint)
        )
        Events(ui, initial, device, work, checkpoints, keep).connect(demo)
    demo.queue(max_size=32, default_concurrency_limit=1)
    _without_analytics(demo)
    if delete_cache is not None:
        start_sweeping(demo, *delete_cache)
    return demo


def _without_analytics(blocks: gr.Blocks) -> None:
    """Keep no per-event analytics in ``blocks``' queue. For its monitoring dashboard, Gradio's queue records
    each event (the last 10,000) and, after every event, rebuilds a pandas summary of all the records in a worker
    thread. Those ever larger tables (in pyarrow's memory pool and glibc's per-thread arenas) made the server's
    memory grow with the requests served: measured with 8 clients and 1,200 /run + /export requests (digits CNN),
    the resident memory went from 912 to 991 MB between the first tenth and the end with them, and stayed
    between 889 and 917 MB without."""
    queue = getattr(blocks, "_queue", None)
    if hasattr(queue, "ANALYTICS_MAX_EVENTS"):
        queue.ANALYTICS_MAX_EVENTS = 1  # Gradio's minimum
    if hasattr(queue, "ANAYLTICS_CACHE_FREQUENCY"):  # Gradio's spelling: events between two summaries
        queue.ANAYLTICS_CACHE_FREQUENCY = sys.maxsize
