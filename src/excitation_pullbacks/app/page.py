"""The explorer page (Gradio Blocks): widgets, events and their named API endpoints.

Endpoints (also for ``gradio_client``): ``/load_model``, ``/pick_image``, ``/run``, ``/step``, ``/export``,
``/stop``. The computations live in :mod:`.panels`; this module converts widget values to their arguments,
turns user errors into ``gr.Error`` messages and results into images.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import threading
import uuid
from pathlib import Path

import gradio as gr
import torch

from excitation_pullbacks import Neuron

from .command import command_line
from .images import ImageError, image_label, list_images, open_image, preprocess
from .models import MODEL_OPTIONS, LoadedModel, ModelError, ModelSpec, load_model, spec_from_key
from .panels import (
    AscentSettings,
    Cancelled,
    Exploration,
    GateSettings,
    explore,
    render_image,
    render_map,
    render_strip,
    step_views,
)

__all__ = [
    "GATE_SHAPES",
    "ImageFile",
    "build_demo",
    "class_choices",
    "parse_pool_temperature",
    "parse_position",
    "parse_temperatures",
]

GATE_SHAPES = ("sigmoid", "normal_cdf", "normal_cdf_tanh", "softsign", "hard", "none")
DEFAULT_TEMPERATURES = "0, 0.1, 0.3, 1, 3"
PAPER_SIZE = 224  # the paper's ascent budget (step 20, eps 100) is for 224 x 224 images; scaled by crop / 224


class ImageFile(gr.Image):
    """An image upload/paste/example widget that hands the raw file path to the function unopened, so that
    :func:`~excitation_pullbacks.app.images.open_image` checks it (non-images, bombs, odd modes) and the page
    shows a clear message instead of a decoding error inside Gradio."""

    def get_block_name(self) -> str:
        return "image"  # the front end of gr.Image

    def preprocess(self, payload):
        if payload is None:
            return None
        if payload.path is None:  # a data: URL (pasted content): let Gradio decode it
            return super().preprocess(payload)
        return str(payload.path)


def parse_temperatures(text: str) -> list[float]:
    """``"0, 0.1, 0.3"`` -> [0.0, 0.1, 0.3]; 1 to 8 finite values >= 0, else ValueError."""
    try:
        values = [float(v) for v in re.split(r"[,\s]+", str(text).strip()) if v]
    except ValueError:
        raise ValueError(f"temperatures must be numbers separated by commas, got {text!r}") from None
    if not 1 <= len(values) <= 8 or not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"give 1 to 8 temperatures >= 0 (0: vanilla gradient), got {text!r}")
    return values


def parse_pool_temperature(text) -> float | None:
    """``""``/None -> None (the ReLU temperature); a number >= 0 -> float; else ValueError."""
    if text is None or not str(text).strip() or str(text).strip().lower() in ("null", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"max-pool T must be a number >= 0 or blank, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"max-pool T must be a number >= 0 or blank, got {text!r}")
    return value


def parse_position(text: str | None) -> tuple[int, int] | None:
    """``""`` -> None (sum over positions); ``"3, 4"`` -> (3, 4); else ValueError."""
    if text is None or not str(text).strip():
        return None
    parts = [p for p in re.split(r"[,\s]+", str(text).strip().strip("()")) if p]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"position must be two row, column numbers such as 3, 4 (or blank), got {text!r}")
    return int(parts[0]), int(parts[1])


def class_choices(loaded: LoadedModel) -> list[str]:
    """The class dropdown's choices: ``name (index)`` for every logit."""
    return [f"{name} ({i})" for i, name in enumerate(loaded.classes)]


def _class_index(choice, loaded: LoadedModel) -> int:
    """A dropdown value ``name (i)``, an index or a class name -> index of the model's classes."""
    text = str(choice).strip() if choice is not None else ""
    m = re.search(r"\((\d+)\)\s*$", text)
    if m:
        i = int(m.group(1))
    elif text.isdigit():
        i = int(text)
    else:
        key = text.lower()
        i = next((j for j, n in enumerate(loaded.classes) if n.lower() == key), -1)
        if i < 0:
            raise ValueError(f"unknown class {choice!r}: pick one from the list")
    if not 0 <= i < len(loaded.classes):
        raise ValueError(f"class index {i} is out of range 0..{len(loaded.classes) - 1}")
    return i


def _label_class(path: str | None, loaded: LoadedModel) -> int | None:
    """The class an image's file name names (``3_chain_saw.jpg``), or None."""
    if not path:
        return None
    name = image_label(path).lower()
    return next((j for j, n in enumerate(loaded.classes) if n.lower() == name), None)


def _ascent_defaults(loaded: LoadedModel) -> tuple[float, float]:
    """The paper's step size 20 and radius 100 scaled to the model's crop (same per-pixel RMS change)."""
    scale = loaded.crop / PAPER_SIZE
    return round(20.0 * scale, 3), round(100.0 * scale, 2)


class _Stops:
    """Per-session stop flags: the Stop button sets its session's flag, the running job checks it."""

    def __init__(self):
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def flag(self, session: str) -> threading.Event:
        with self._lock:
            return self._flags.setdefault(session, threading.Event())


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "local"


def build_demo(
    initial: ModelSpec = MODEL_OPTIONS[0],
    *,
    device: str = "auto",
    images: str | os.PathLike | None = None,
    work_dir: str | os.PathLike | None = None,
) -> gr.Blocks:
    """The explorer page, with ``initial`` loaded (and cached) and the folder ``images`` in the gallery.

    device: where models run (auto: cuda when available). work_dir: where runs save their input image and
    exports (default: a new temporary folder).
    """
    loaded0 = load_model(initial, device)
    options = list(MODEL_OPTIONS)
    if initial not in options:
        options.insert(0, initial)
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="pullbacks-app-"))
    work.mkdir(parents=True, exist_ok=True)
    gallery = [str(p) for p in list_images(images)]
    stops = _Stops()
    compute = threading.Lock()  # one computation at a time: the excitation context hooks the shared model
    step0, eps0 = _ascent_defaults(loaded0)

    def get_model(key: str, checkpoint: str | None) -> LoadedModel:
        spec = initial if key == initial.key and not checkpoint else spec_from_key(key, checkpoint)
        return load_model(spec, device)

    # -- events ---------------------------------------------------------------------------------------
    def on_model(key, checkpoint, progress=gr.Progress()):  # noqa: B008 - Gradio injects the tracker by this default
        progress(0, desc="loading model")
        try:
            loaded = get_model(key, checkpoint)
        except ModelError as err:
            raise gr.Error(str(err), print_exception=False) from None
        step_size, eps = _ascent_defaults(loaded)
        status = (
            f"**{loaded.spec.label}** on {loaded.device}: {len(loaded.classes)} classes, input "
            f"{loaded.crop} x {loaded.crop}, {sum(n for _, n in loaded.sites)} gated calls"
        )
        choices = class_choices(loaded)
        return (
            status,
            gr.update(choices=choices, value=choices[0]),
            gr.update(choices=list(loaded.layers), value=loaded.layers[0] if loaded.layers else None),
            step_size,
            eps,
        )

    def on_image(key, checkpoint, path):
        """A newly picked image: the class its file name names becomes the target (when the model has it)."""
        if not path:
            return gr.update()
        try:
            loaded = get_model(key, checkpoint)
        except ModelError:
            return gr.update()
        i = _label_class(path, loaded)
        return gr.update() if i is None else gr.update(value=class_choices(loaded)[i])

    def run(
        key,
        checkpoint,
        path,
        mode,
        choice,
        layer,
        channel,
        position,
        shape,
        temperature,
        pool_temperature,
        pool_detach,
        steps,
        step_size,
        eps,
        temperatures,
        request: gr.Request,
        progress=gr.Progress(),  # noqa: B008 - as above
    ):
        stop = stops.flag(_session(request))
        stop.clear()
        try:
            loaded = get_model(key, checkpoint)
            image = open_image(path)
            x = preprocess(image, loaded.resize, loaded.crop).to(loaded.device)
            if mode == "hidden neuron":
                if not layer:
                    raise ValueError("pick a layer for the hidden neuron")
                target = Neuron(str(layer), int(channel or 0), parse_position(position))
            else:
                target = _class_index(choice, loaded)
            gate = GateSettings(
                str(shape), float(temperature), parse_pool_temperature(pool_temperature), bool(pool_detach)
            )
            settings = AscentSettings(int(steps), float(step_size), float(eps))
            temps = parse_temperatures(temperatures)
            total = 3 + (0 if isinstance(target, Neuron) else 2 * settings.steps)  # explore's ticks
            done = [0]

            def tick(what: str) -> None:
                if stop.is_set():
                    raise Cancelled("stopped")
                progress(min(done[0] / total, 1.0), desc=f"{what} ({done[0] + 1}/{total})")
                done[0] += 1

            with compute:
                result = explore(loaded.model, x, target, loaded.classes, gate, settings, temps, tick)
        except Cancelled:
            raise gr.Error("stopped", print_exception=False) from None
        except (ImageError, ModelError, ValueError) as err:
            raise gr.Error(" ".join(str(err).split()), print_exception=False) from None
        row = _label_class(path, loaded)
        if row is None:
            row = int(re.search(r"\((\d+)\)$", next(iter(result.before))).group(1))
            where = "the top-1 prediction"
        else:
            where = "the file name"
        folder = work / "runs" / uuid.uuid4().hex[:12] / "input"
        folder.mkdir(parents=True)
        image.save(folder / f"0_{row}.png")
        column = row if isinstance(target, Neuron) else target
        lines = [
            (
                f"# image class (row): {loaded.classes[row]} ({row}), from {where}; target column: "
                f"{loaded.classes[column]} ({column})"
            )
        ]
        if isinstance(target, Neuron):
            lines.append("# hidden-neuron targets are no pipeline option: this command targets the image's class")
        lines.append(
            command_line(
                loaded.spec,
                gate=gate,
                ascent=settings,
                data_root=str(folder),
                resize=loaded.resize,
                crop=loaded.crop,
                image_class=row,
                target_class=column,
                gpu=loaded.device.type == "cuda",
            )
        )
        state = {"result": result, "command": "\n".join(lines), "input_dir": str(folder)}
        return (state, *_panels(result, settings.steps), result.report, state["command"])

    def _panels(result: Exploration, steps: int):
        has_ascent = bool(result.trajectories)
        views = _step_images(result, steps if has_ascent else 0)
        return (
            render_image(result.x[0]),
            render_map(result.vanilla[0]),
            render_map(result.excitation[0]),
            result.before,
            result.after.get("excitation"),
            result.after.get("vanilla"),
            render_strip(result.strip, result.temperatures),
            gr.update(
                maximum=max(steps, 1) if has_ascent else 1, value=steps if has_ascent else 0, interactive=has_ascent
            ),
            *views,
        )

    def _step_images(result: Exploration, step: int):
        if not result.trajectories:
            return (None, None, None, None)
        return (*step_views(result.trajectories["excitation"], step), *step_views(result.trajectories["vanilla"], step))

    def show_step(state, step):
        if not state:
            return (None, None, None, None)
        return _step_images(state["result"], int(step))

    def export(state, step):
        if not state:
            raise gr.Error("nothing to export yet: press Run first", print_exception=False)
        result: Exploration = state["result"]
        out = work / "exports" / uuid.uuid4().hex[:12]
        out.mkdir(parents=True)
        panels = {
            "input": render_image(result.x[0]),
            "vanilla_gradient": render_map(result.vanilla[0]),
            "excitation_pullback": render_map(result.excitation[0]),
            "temperature_strip": render_strip(result.strip, result.temperatures),
        }
        if result.trajectories:
            names = ("ascent_excitation", "difference_excitation", "ascent_vanilla", "difference_vanilla")
            panels.update({f"{n}_step{int(step)}": im for n, im in zip(names, _step_images(result, int(step)))})
        files = []
        for name, im in panels.items():
            im.save(out / f"{name}.png")
            files.append(str(out / f"{name}.png"))
        torch.save(
            {
                "x": result.x,
                "vanilla": result.vanilla,
                "excitation": result.excitation,
                "temperatures": torch.tensor(result.temperatures),
                "strip": result.strip,
                "trajectories": result.trajectories,
            },
            out / "tensors.pt",
        )
        (out / "command.txt").write_text(state["command"] + "\n")
        return files + [str(out / "tensors.pt"), str(out / "command.txt")]

    def request_stop(request: gr.Request):
        stops.flag(_session(request)).set()

    # -- layout ---------------------------------------------------------------------------------------
    with gr.Blocks(title="Excitation pullbacks explorer") as demo:
        gr.Markdown(
            "## Excitation pullbacks explorer\nInput gradients with soft backward gates sigmoid(z/T) "
            "(forward untouched), side by side with the vanilla gradient, and projected gradient ascent "
            "along each."
        )
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                model_key = gr.Dropdown([(s.label, s.key) for s in options], value=initial.key, label="Model")
                checkpoint = gr.Textbox(
                    value=initial.checkpoint or "",
                    label="Local checkpoint (state dict; optional)",
                    placeholder="/path/to/weights.pt",
                )
                status = gr.Markdown(
                    f"**{loaded0.spec.label}** on {loaded0.device}: {len(loaded0.classes)} classes, "
                    f"input {loaded0.crop} x {loaded0.crop}, "
                    f"{sum(n for _, n in loaded0.sites)} gated calls"
                )
                image = ImageFile(
                    type="filepath",
                    image_mode=None,
                    sources=["upload", "clipboard"],
                    label="Image",
                    height=240,
                    elem_id="image",
                )
                if gallery:
                    gr.Examples(gallery, inputs=image, label="Image folder", examples_per_page=20, elem_id="gallery")
                mode = gr.Radio(["class", "hidden neuron"], value="class", label="Target")
                choices0 = class_choices(loaded0)
                target_class = gr.Dropdown(
                    choices0, value=choices0[0], label="Class (type to filter)", filterable=True, elem_id="target-class"
                )
                with gr.Row(equal_height=True):
                    layer = gr.Dropdown(
                        list(loaded0.layers),
                        value=loaded0.layers[0] if loaded0.layers else None,
                        label="Layer (gated site)",
                    )
                    channel = gr.Number(0, precision=0, minimum=0, label="Channel")
                    position = gr.Textbox("", label="Position h, w (blank: sum)")
                with gr.Row():
                    run_btn = gr.Button("Run", variant="primary", elem_id="run")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                with gr.Accordion("Gate", open=True):
                    shape = gr.Dropdown(list(GATE_SHAPES), value="sigmoid", label="Gate shape")
                    temperature = gr.Slider(
                        0.0, 3.0, value=0.3, step=0.01, label="Temperature T", elem_id="temperature"
                    )
                    pool_temperature = gr.Textbox("", label="Max-pool T (blank: same as T)")
                    pool_detach = gr.Checkbox(False, label="Detach max-pool softmax weights")
                with gr.Accordion("Ascent", open=False):
                    steps = gr.Slider(0, 30, value=10, step=1, label="Steps")
                    step_size = gr.Number(step0, label="Step size (L2)")
                    eps = gr.Number(eps0, label="Radius eps (L2)")
                temperatures = gr.Textbox(DEFAULT_TEMPERATURES, label="Temperature strip (T values; 0 = vanilla)")
            with gr.Column(scale=2):
                with gr.Row():
                    shown = gr.Image(label="Input (preprocessed)", elem_id="out-input", format="png")
                    vanilla = gr.Image(label="Vanilla gradient", elem_id="out-vanilla", format="png")
                    excitation = gr.Image(label="Excitation pullback", elem_id="out-excitation", format="png")
                with gr.Row():
                    before = gr.Label(num_top_classes=5, label="Top-5 before ascent")
                    after_ex = gr.Label(num_top_classes=5, label="After excitation ascent")
                    after_va = gr.Label(num_top_classes=5, label="After vanilla ascent")
                gr.Markdown("**Excitation pullback at several temperatures**")
                strip = gr.Image(show_label=False, elem_id="out-strip", format="png")
                step = gr.Slider(0, 10, value=0, step=1, label="Ascent step", interactive=False, elem_id="step")
                with gr.Row():
                    ex_img = gr.Image(label="Excitation ascent", format="png", elem_id="out-ex-step")
                    ex_diff = gr.Image(label="Difference (excitation)", format="png")
                    va_img = gr.Image(label="Vanilla ascent", format="png")
                    va_diff = gr.Image(label="Difference (vanilla)", format="png")
                report = gr.Code(label="Gated call sites", language=None, lines=4, max_lines=12)
                command = gr.Code(
                    label="Reproduce with the pipeline", language="shell", lines=2, max_lines=6, elem_id="command"
                )
                export_btn = gr.Button("Export panels, tensors and command")
                files = gr.File(label="Exported files", file_count="multiple", height=120)

        model_key.change(
            on_model, [model_key, checkpoint], [status, target_class, layer, step_size, eps], api_name="load_model"
        )
        checkpoint.submit(
            on_model, [model_key, checkpoint], [status, target_class, layer, step_size, eps], api_name=False
        )
        image.change(
            on_image, [model_key, checkpoint, image], [target_class], api_name="pick_image", concurrency_limit=None
        )
        inputs = [
            model_key,
            checkpoint,
            image,
            mode,
            target_class,
            layer,
            channel,
            position,
            shape,
            temperature,
            pool_temperature,
            pool_detach,
            steps,
            step_size,
            eps,
            temperatures,
        ]
        outputs = [
            state,
            shown,
            vanilla,
            excitation,
            before,
            after_ex,
            after_va,
            strip,
            step,
            ex_img,
            ex_diff,
            va_img,
            va_diff,
            report,
            command,
        ]
        run_event = run_btn.click(run, inputs, outputs, api_name="run")
        step.change(
            show_step,
            [state, step],
            [ex_img, ex_diff, va_img, va_diff],
            api_name="step",
            concurrency_limit=None,
            show_progress="hidden",
        )
        export_btn.click(export, [state, step], [files], api_name="export", concurrency_limit=None)
        stop_btn.click(
            request_stop, None, None, cancels=[run_event], api_name="stop", concurrency_limit=None, queue=False
        )
    demo.queue(max_size=32, default_concurrency_limit=1)
    return demo
