"""The explorer's events: what each button, picker and slider does, and their named API endpoints.

Each handler takes its inputs as one dict keyed by component (Gradio's set-of-components ``inputs``) and reads
them into a small dataclass by field name (:meth:`.Layout.read`); it returns a dict keyed by component. So no
handler depends on the order of a list of inputs or outputs. Endpoints (also for ``gradio_client``):
``/load_model``, ``/pick_image``, ``/pick_rules``, ``/run``, ``/step``, ``/export``, ``/stop``; their parameters come in the
order the components are created (:func:`.build_layout`), their results in the order of the outputs listed in
:meth:`Events.connect`. A session that goes away (page closed, API client gone) stops its running computation.
"""

from __future__ import annotations

import re
import shutil
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import gradio as gr
import torch
from PIL import Image

from excitation_pullbacks import Neuron

from .checkpoints import Checkpoints
from .command import command_line
from .images import ImageError, open_upload, preprocess
from .inputs import (
    ascent_defaults,
    class_choices,
    class_index,
    label_class,
    parse_temperatures,
    preset_fields,
    rules_gate,
    target_neuron,
)
from .layout import Layout, layer_choices, model_status
from .methods import read_settings
from .models import LoadedModel, ModelError, ModelSpec, load_model, spec_from_key
from .panels import (
    AscentSettings,
    Cancelled,
    Exploration,
    explore,
    render_image,
    render_map,
    render_strip,
    step_views,
)
from .workspace import Workspace

__all__ = ["Events", "ImageInputs", "ModelInputs", "RulesInputs", "RunInputs", "StepInputs"]


@dataclass(frozen=True)
class ModelInputs:
    """The model picker: ``name|weights`` key and a local checkpoint's name on the page (blank: none)."""

    model_key: str
    checkpoint: str | None


@dataclass(frozen=True)
class ImageInputs(ModelInputs):
    """The model and the picked image's file path (None: none yet)."""

    image: str | None


@dataclass(frozen=True)
class RunInputs(ImageInputs):
    """Everything a run reads: model, image, target (a class, or a hidden neuron at layer/channel and a
    position or token), gate (a preset's rules with shape, T, max-pool T and detach), ascent, the
    temperature strip's values and the method panel (a pullback variant and its settings), as the widgets
    hold them."""

    mode: str
    target_class: str | None
    layer: str | None
    channel: float | None
    position: str | None
    token: str | None
    rules: str
    shape: str
    temperature: float
    pool_temperature: str | None
    pool_detach: bool
    steps: float
    step_size: float
    eps: float
    temperatures: str
    method: str
    times_input: bool
    method_steps: float
    method_step_size: float
    method_clip: bool
    samples: float
    noise: float
    weight_samples: float
    weight_noise: float
    seed: float


@dataclass(frozen=True)
class RulesInputs:
    """The gate panel's preset."""

    rules: str


@dataclass(frozen=True)
class StepInputs:
    """The last run (per session) and the ascent step to show or export."""

    state: dict | None
    step: float


class _Stops:
    """Per-session stop flags: the Stop button sets its session's flag, the running job checks it."""

    def __init__(self):
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def flag(self, session: str) -> threading.Event:
        with self._lock:
            return self._flags.setdefault(session, threading.Event())

    def stop(self, session: str) -> None:
        """Set the session's flag when it has one (a session gone away: nothing is kept for it)."""
        with self._lock:
            flag = self._flags.get(session)
        if flag is not None:
            flag.set()

    def release(self, session: str) -> None:
        """Forget the session's flag (its run ended)."""
        with self._lock:
            self._flags.pop(session, None)


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "local"


def _message(err: BaseException) -> str:
    return " ".join(str(err).split())


class Events:
    """The handlers of the page ``ui``: models are built for ``device`` (``initial`` as given, others from the
    picker, local checkpoints only those ``checkpoints`` offers), runs save their input image and exports under
    ``work`` (the newest ``keep`` of each); one computation runs at a time (the excitation context hooks the
    shared model)."""

    def __init__(
        self, ui: Layout, initial: ModelSpec, device: str, work: Path, checkpoints: Checkpoints, keep: int = 64
    ):
        self.ui, self.initial, self.device = ui, initial, device
        self.work = Workspace(work, keep)
        self.checkpoints = checkpoints
        self.stops = _Stops()
        self.compute = threading.Lock()

    def model(self, key: str, checkpoint: str | None) -> LoadedModel:
        """The (cached) model the picker names. Raises ModelError (also for a checkpoint not offered), whose
        message names a checkpoint as the page does."""
        path = self.checkpoints.resolve(checkpoint)
        spec = self.initial if key == self.initial.key and path == self.initial.checkpoint else spec_from_key(key, path)
        try:
            return load_model(spec, self.device)
        except ModelError as err:
            if not path:
                raise
            raise ModelError(str(err).replace(path, self.checkpoints.shown(path))) from None

    # -- handlers -------------------------------------------------------------------------------------
    def on_model(self, values: dict, progress=gr.Progress()) -> dict:  # noqa: B008 - Gradio injects the tracker by this default
        """A model picked: its status line, class and layer choices, and ascent defaults for its input size."""
        ui, v = self.ui, self.ui.read(values, ModelInputs)
        progress(0, desc="loading model")
        try:
            loaded = self.model(v.model_key, v.checkpoint)
        except ModelError as err:
            raise gr.Error(str(err), print_exception=False) from None
        step_size, eps = ascent_defaults(loaded)
        choices = class_choices(loaded)
        return {
            ui.status: model_status(loaded),
            ui.target_class: gr.update(choices=choices, value=choices[0]),
            ui.layer: gr.update(choices=layer_choices(loaded), value=loaded.layers[0] if loaded.layers else None),
            ui.step_size: step_size,
            ui.eps: eps,
            ui.method_step_size: step_size,
        }

    def on_image(self, values: dict) -> dict:
        """A newly picked image: the class its file name names becomes the target (when the model has it)."""
        v = self.ui.read(values, ImageInputs)
        unchanged = {self.ui.target_class: gr.update()}
        if not v.image:
            return unchanged
        try:
            loaded = self.model(v.model_key, v.checkpoint)
        except ModelError:
            return unchanged
        i = label_class(v.image, loaded)
        return unchanged if i is None else {self.ui.target_class: gr.update(value=class_choices(loaded)[i])}

    def on_rules(self, values: dict) -> dict:
        """A preset picked: the gate panel's fields show its shape, T, max-pool T and detach."""
        ui, v = self.ui, self.ui.read(values, RulesInputs)
        try:
            shape, temperature, pool_temperature, pool_detach = preset_fields(str(v.rules))
        except ValueError as err:
            raise gr.Error(_message(err), print_exception=False) from None
        return {
            ui.shape: shape,
            ui.temperature: temperature,
            ui.pool_temperature: pool_temperature,
            ui.pool_detach: pool_detach,
        }

    def run(self, values: dict, request: gr.Request, progress=gr.Progress()) -> dict:  # noqa: B008 - as above
        """Pullbacks, ascent and strip for the picked image and target; the command line that reproduces it."""
        v = self.ui.read(values, RunInputs)
        session = _session(request)
        stop = self.stops.flag(session)
        stop.clear()
        try:
            loaded = self.model(v.model_key, v.checkpoint)
            image, note = open_upload(v.image)
            x = preprocess(image, loaded.resize, loaded.crop).to(loaded.device)
            if v.mode == "hidden neuron":
                target = target_neuron(loaded, v.layer, v.channel, v.position, v.token)
            else:
                target = class_index(v.target_class, loaded)
            gate = rules_gate(str(v.rules), v.shape, v.temperature, v.pool_temperature, v.pool_detach)
            settings = AscentSettings(int(v.steps), float(v.step_size), float(v.eps))
            temps = parse_temperatures(v.temperatures)
            method = read_settings(
                v.method,
                v.times_input,
                v.method_steps,
                v.method_step_size,
                v.method_clip,
                v.samples,
                v.noise,
                v.weight_samples,
                v.weight_noise,
                v.seed,
            )
            total = 4 + (0 if isinstance(target, Neuron) else 2 * settings.steps)  # explore's ticks
            done = [0]

            def tick(what: str) -> None:
                if stop.is_set():
                    raise Cancelled("stopped")
                progress(min(done[0] / total, 1.0), desc=f"{what} ({done[0] + 1}/{total})")
                done[0] += 1

            def should_stop() -> None:
                if stop.is_set():
                    raise Cancelled("stopped")

            with self.compute:
                should_stop()  # stopped, or its client went away, while it waited for the model
                result = explore(
                    loaded.model, x, target, loaded.classes, gate, settings, temps, tick, method, should_stop
                )
        except Cancelled:
            raise gr.Error("stopped", print_exception=False) from None
        except (ImageError, ModelError, ValueError) as err:
            raise gr.Error(_message(err), print_exception=False) from None
        finally:
            self.stops.release(session)
        row = label_class(v.image, loaded)
        if row is None:
            row = int(re.search(r"\((\d+)\)$", next(iter(result.before))).group(1))
            where = "the top-1 prediction"
        else:
            where = "the file name"
        folder = self.work.new("runs") / "input"
        folder.mkdir()
        image.save(folder / f"0_{row}.png")
        column = row if isinstance(target, Neuron) else target
        lines = [
            (
                f"# image class (row): {loaded.classes[row]} ({row}), from {where}; target column: "
                f"{loaded.classes[column]} ({column})"
            ),
            "# run it in the folder of the exported files: their input/ holds the image",
        ]
        if isinstance(target, Neuron):
            lines.append("# hidden-neuron targets are no pipeline option: this command targets the image's class")
        lines.append(f"# the page's method map: {result.method_name} (with the gate below)")
        lines.append(
            command_line(
                replace(loaded.spec, checkpoint=self.checkpoints.public(loaded.spec.checkpoint)),
                gate=gate,
                rules=str(v.rules),
                ascent=settings,
                data_root="input",
                resize=loaded.resize,
                crop=loaded.crop,
                image_class=row,
                target_class=column,
                gpu=loaded.device.type == "cuda",
            )
        )
        state = {"result": result, "command": "\n".join(lines), "input_dir": str(folder)}
        return {
            self.ui.state: state,
            self.ui.note: f"Input {note}; method map: {result.method_name}",
            **self._as_files(self._panels(result, settings.steps)),
            self.ui.report: result.report,
            self.ui.command: state["command"],
        }

    def show_step(self, values: dict) -> dict:
        """The ascent images and differences at the slider's step."""
        v = self.ui.read(values, StepInputs)
        if not v.state:
            return self._step_views(None, 0)
        return self._as_files(self._step_views(v.state["result"], int(v.step)))

    def export(self, values: dict) -> dict:
        """The panels (ascent at the slider's step), tensors.pt and command.txt of the last run, as files."""
        v = self.ui.read(values, StepInputs)
        if not v.state:
            raise gr.Error("nothing to export yet: press Run first", print_exception=False)
        result: Exploration = v.state["result"]
        step = int(v.step)
        if not Path(v.state["input_dir"]).is_dir():
            raise gr.Error("this run's files were cleaned up since: press Run again", print_exception=False)
        out = self.work.new("exports")
        panels = {
            "input": render_image(result.x[0]),
            "vanilla_gradient": render_map(result.vanilla[0]),
            "excitation_pullback": render_map(result.excitation[0]),
            "temperature_strip": render_strip(result.strip, result.temperatures),
        }
        if result.method is not None:
            panels["method"] = render_map(result.method[0])
        if result.trajectories:
            names = ("ascent_excitation", "difference_excitation", "ascent_vanilla", "difference_vanilla")
            views = self._step_views(result, step)
            images = (views[self.ui.ex_img], views[self.ui.ex_diff], views[self.ui.va_img], views[self.ui.va_diff])
            panels.update({f"{n}_step{step}": im for n, im in zip(names, images)})
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
                "method": result.method,
                "method_name": result.method_name,
            },
            out / "tensors.pt",
        )
        (out / "command.txt").write_text(v.state["command"] + "\n")
        inputs = shutil.copytree(v.state["input_dir"], out / "input")
        files += [str(out / "tensors.pt"), str(out / "command.txt"), *(str(p) for p in sorted(inputs.iterdir()))]
        return {self.ui.files: files}

    def request_stop(self, request: gr.Request) -> None:
        """Stop this session's running computation (at its next tick)."""
        self.stops.flag(_session(request)).set()

    def on_unload(self, request: gr.Request) -> None:
        """A session went away (its page closed, its API client gone): stop its running computation, so that
        the queue goes on with the next."""
        self.stops.stop(_session(request))

    # -- results -> components ------------------------------------------------------------------------
    def _as_files(self, views: dict) -> dict:
        """``views`` with each PIL image saved as a PNG in a new ``panels`` folder of the work area (its path in
        its place). Gradio copies a file into its cache under a temporary name and renames it into place; an
        image it encodes itself it writes in place under the content's hash, so an identical panel of another
        client's request, rewritten while it is being downloaded, arrived truncated (seen under load: "peer
        closed connection without sending complete message body")."""
        folder, out = None, {}
        for i, (component, value) in enumerate(views.items()):
            if isinstance(value, Image.Image):
                folder = folder or self.work.new("panels")
                value.save(folder / f"{i}.png")
                value = str(folder / f"{i}.png")
            out[component] = value
        return out

    def _panels(self, result: Exploration, steps: int) -> dict:
        ui = self.ui
        has_ascent = bool(result.trajectories)
        return {
            ui.shown: render_image(result.x[0]),
            ui.vanilla: render_map(result.vanilla[0]),
            ui.excitation: render_map(result.excitation[0]),
            ui.before: result.before,
            ui.after_ex: result.after.get("excitation"),
            ui.after_va: result.after.get("vanilla"),
            ui.strip: render_strip(result.strip, result.temperatures),
            ui.method_img: None if result.method is None else render_map(result.method[0]),
            ui.step: gr.update(
                maximum=max(steps, 1) if has_ascent else 1, value=steps if has_ascent else 0, interactive=has_ascent
            ),
            **self._step_views(result, steps if has_ascent else 0),
        }

    def _step_views(self, result: Exploration | None, step: int) -> dict:
        ui = self.ui
        if result is None or not result.trajectories:
            return {ui.ex_img: None, ui.ex_diff: None, ui.va_img: None, ui.va_diff: None}
        ex, ex_diff = step_views(result.trajectories["excitation"], step)
        va, va_diff = step_views(result.trajectories["vanilla"], step)
        return {ui.ex_img: ex, ui.ex_diff: ex_diff, ui.va_img: va, ui.va_diff: va_diff}

    # -- wiring ---------------------------------------------------------------------------------------
    def connect(self, blocks: gr.Blocks) -> None:
        """Attach the handlers to the components (inside the page's ``gr.Blocks``, ``blocks``), with their API
        names; a session's unload stops its computation."""
        ui = self.ui
        model_outputs = [ui.status, ui.target_class, ui.layer, ui.step_size, ui.eps, ui.method_step_size]
        ui.model_key.change(self.on_model, ui.inputs(ModelInputs), model_outputs, api_name="load_model")
        ui.checkpoint.input(self.on_model, ui.inputs(ModelInputs), model_outputs, api_name=False)
        ui.image.change(
            self.on_image, ui.inputs(ImageInputs), [ui.target_class], api_name="pick_image", concurrency_limit=None
        )
        ui.rules.change(
            self.on_rules,
            ui.inputs(RulesInputs),
            [ui.shape, ui.temperature, ui.pool_temperature, ui.pool_detach],
            api_name="pick_rules",
            concurrency_limit=None,
            show_progress="hidden",
        )
        run_outputs = [
            ui.state,
            ui.note,
            ui.shown,
            ui.vanilla,
            ui.excitation,
            ui.before,
            ui.after_ex,
            ui.after_va,
            ui.strip,
            ui.method_img,
            ui.step,
            ui.ex_img,
            ui.ex_diff,
            ui.va_img,
            ui.va_diff,
            ui.report,
            ui.command,
        ]
        run_event = ui.run_btn.click(self.run, ui.inputs(RunInputs), run_outputs, api_name="run")
        ui.step.change(
            self.show_step,
            ui.inputs(StepInputs),
            [ui.ex_img, ui.ex_diff, ui.va_img, ui.va_diff],
            api_name="step",
            concurrency_limit=None,
            show_progress="hidden",
        )
        ui.export_btn.click(self.export, ui.inputs(StepInputs), [ui.files], api_name="export", concurrency_limit=None)
        ui.stop_btn.click(
            self.request_stop, None, None, cancels=[run_event], api_name="stop", concurrency_limit=None, queue=False
        )
        blocks.unload(self.on_unload)
