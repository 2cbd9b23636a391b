"""Interactive explorer (Gradio) over the core: pullbacks, ascent and gate settings for one image at a time.

Start it with ``pullbacks-app``; build the page in code with ``excitation_pullbacks.app.page.build_demo``.
Nothing here is imported by the core, so the core works without Gradio installed.
"""
