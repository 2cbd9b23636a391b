"""The sweep of Gradio's cache of uploads and results: every ``frequency`` s, the files a page handed out more
than ``age`` s ago are deleted (the ones its components keep, e.g. the gallery's examples, excepted).

Gradio's own ``Blocks(delete_cache=...)`` does this in a background task. Measured with 8 concurrent clients,
it swept nothing: 1,878 files after 96 requests at a 3 s age, 14,782 (175 MB) after 1,200 at 120 s. Its loop
iterates the page's live file sets while request threads add to them, which raises "Set changed size during
iteration" and, uncaught, would end the task silently (the likely cause; not traced further). This sweep reads
each set as a snapshot (one C-level copy, which no other Python thread can interleave with) and goes on after
an error.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref

import gradio as gr

__all__ = ["start_sweeping", "sweep"]

log = logging.getLogger(__name__)


def sweep(blocks: gr.Blocks, age: float) -> int:
    """Delete the files of ``blocks``' cache sets created more than ``age`` s ago; returns how many."""
    keep = set()
    for component in list(blocks.blocks.values()):
        keep.update(getattr(component, "keep_in_cache", set()))
    now, removed = time.time(), 0
    for files in list(blocks.temp_file_sets):
        for name in list(files):  # a snapshot: one C-level copy, atomic for other Python threads
            if name in keep:
                continue
            try:
                if now - os.lstat(name).st_ctime > age:
                    os.remove(name)
                    removed += 1
                    files.discard(name)
            except FileNotFoundError:  # gone already
                files.discard(name)
            except OSError as err:
                log.warning("cannot remove cached file %s: %s", name, err)
    return removed


def start_sweeping(blocks: gr.Blocks, frequency: float, age: float) -> threading.Thread:
    """Sweep ``blocks``' cache every ``frequency`` s (files older than ``age`` s) in a daemon thread, until the
    page is closed after serving (or is gone: the thread holds it weakly)."""
    ref = weakref.ref(blocks)

    def loop() -> None:
        served = False
        while True:
            time.sleep(frequency)
            page = ref()
            if page is None or (served and not page.is_running):
                return
            served = served or page.is_running
            try:
                sweep(page, age)
            except Exception:
                log.exception("cache sweep failed")
            del page

    thread = threading.Thread(target=loop, name="pullbacks-app-cache-sweep", daemon=True)
    thread.start()
    return thread
