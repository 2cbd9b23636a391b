"""The explorer's widgets (Gradio components) and their arrangement on the page, named in one :class:`Layout`.

Event handlers read their inputs by component (:meth:`Layout.read`), never by position in a list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import gradio as gr

from excitation_pullbacks.gates import RELU_SHAPES

from .inputs import RULES, ascent_defaults, class_choices, preset_fields
from .methods import METHODS, MethodSettings
from .models import LoadedModel, ModelSpec

__all__ = [
    "DEFAULT_TEMPERATURES",
    "GATE_SHAPES",
    "ImageFile",
    "Layout",
    "build_layout",
    "layer_choices",
    "model_status",
]

#: The gate shapes the page offers: the core's ReLU shapes (``own`` is the ReLU's hard gate there).
GATE_SHAPES = tuple(s for s in RELU_SHAPES if s != "own")
DEFAULT_TEMPERATURES = "0, 0.1, 0.3, 1, 3"


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


def model_status(loaded: LoadedModel) -> str:
    """The line under the model picker: label, device, classes, input size, gated calls (and, for a model with
    norm or attention sites, which rules are made for it)."""
    line = (
        f"**{loaded.spec.label}** on {loaded.device}: {len(loaded.classes)} classes, input "
        f"{loaded.crop} x {loaded.crop}, {sum(n for _, n in loaded.sites)} gated calls"
    )
    deep = [k for k in ("norm", "attention") if k in loaded.kinds]
    if deep:
        line += f" ({' and '.join(deep)} sites: Rules semantic gates them, paper leaves them exact)"
    return line


def layer_choices(loaded: LoadedModel) -> list[tuple[str, str]]:
    """The layer dropdown's (label, value) choices: each hidden-neuron layer with its output shape and layout."""
    return [
        (f"{name}  {tuple(loaded.shapes[name][1:])} {loaded.layouts[name].replace('_', ' ')}", name)
        for name in loaded.layers
    ]


@dataclass(frozen=True)
class Layout:
    """Every component of the page that an event reads or writes, by name.

    Inputs (left column): model_key, checkpoint, image, mode, target_class, layer, channel, position, token,
    rules, shape, temperature, pool_temperature, pool_detach, steps, step_size, eps, temperatures, method,
    times_input, method_steps, method_step_size, method_clip, samples, noise, weight_samples, weight_noise, seed.
    Outputs (right column): note (what was read from the image), shown, vanilla, excitation (panels), before,
    after_ex, after_va (top-5 labels), strip, method_img (the method's map), step (slider), ex_img, ex_diff,
    va_img, va_diff (ascent step views), report, command, files. ``state`` holds the last
    run (its Exploration, command and input folder) per session.
    """

    state: gr.State
    model_key: gr.Dropdown
    checkpoint: gr.Dropdown
    status: gr.Markdown
    image: ImageFile
    mode: gr.Radio
    target_class: gr.Dropdown
    layer: gr.Dropdown
    channel: gr.Number
    position: gr.Textbox
    token: gr.Textbox
    run_btn: gr.Button
    stop_btn: gr.Button
    rules: gr.Dropdown
    shape: gr.Dropdown
    temperature: gr.Slider
    pool_temperature: gr.Textbox
    pool_detach: gr.Checkbox
    steps: gr.Slider
    step_size: gr.Number
    eps: gr.Number
    temperatures: gr.Textbox
    method: gr.Dropdown
    times_input: gr.Checkbox
    method_steps: gr.Slider
    method_step_size: gr.Number
    method_clip: gr.Checkbox
    samples: gr.Slider
    noise: gr.Number
    weight_samples: gr.Slider
    weight_noise: gr.Number
    seed: gr.Number
    note: gr.Markdown
    shown: gr.Image
    vanilla: gr.Image
    excitation: gr.Image
    before: gr.Label
    after_ex: gr.Label
    after_va: gr.Label
    strip: gr.Image
    method_img: gr.Image
    step: gr.Slider
    ex_img: gr.Image
    ex_diff: gr.Image
    va_img: gr.Image
    va_diff: gr.Image
    report: gr.Code
    command: gr.Code
    export_btn: gr.Button
    files: gr.File

    def inputs(self, values_type) -> set:
        """The components whose names are the fields of the dataclass ``values_type``: an event's ``inputs``
        (a set, so that Gradio hands the handler one dict keyed by component)."""
        return {getattr(self, f.name) for f in fields(values_type)}

    def read(self, values: dict, values_type):
        """The dict an event with :meth:`inputs` received -> a ``values_type`` with each field's value."""
        return values_type(**{f.name: values[getattr(self, f.name)] for f in fields(values_type)})


def build_layout(
    initial: ModelSpec,
    options: Sequence[ModelSpec],
    loaded: LoadedModel,
    gallery: list[str],
    checkpoints: Sequence[str] = (),
    checkpoint0: str = "",
) -> Layout:
    """Create the page's components inside the open ``gr.Blocks``, with the ``initial`` model (``loaded``)
    selected among ``options``, the image files ``gallery`` as examples, and the checkpoint names
    ``checkpoints`` offered (``checkpoint0`` selected: the initial model's, or "" for none).

    Components are created in the order of their API parameters: an event's set of inputs reaches API clients
    (gradio_client) in creation order.
    """
    step0, eps0 = ascent_defaults(loaded)
    gr.Markdown(
        "## Excitation pullbacks explorer\nInput gradients with soft backward gates (sigmoid(z/T) at ReLUs; "
        "the Rules add GELU, norm and attention rules for transformers; forward untouched), side by side with the "
        "vanilla gradient, and projected gradient ascent along each."
    )
    state = gr.State(None)
    with gr.Row():
        with gr.Column(scale=1, min_width=320):
            model_key = gr.Dropdown([(s.label, s.key) for s in options], value=initial.key, label="Model")
            checkpoint = gr.Dropdown(
                [("none", ""), *((c, c) for c in checkpoints)],
                value=checkpoint0,
                label="Local checkpoint (state dict; optional)",
                info=None if checkpoints else "none offered: start with pullbacks-app --checkpoint-dir DIR",
                allow_custom_value=True,
                interactive=bool(checkpoints),
                elem_id="checkpoint",
            )
            status = gr.Markdown(model_status(loaded))
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
            choices0 = class_choices(loaded)
            target_class = gr.Dropdown(
                choices0, value=choices0[0], label="Class (type to filter)", filterable=True, elem_id="target-class"
            )
            layer = gr.Dropdown(
                layer_choices(loaded),
                value=loaded.layers[0] if loaded.layers else None,
                label="Layer (gated site)",
                info="hidden neuron: output shape (without N) and where its channels are",
            )
            with gr.Row(equal_height=True):
                channel = gr.Number(0, precision=0, minimum=0, label="Channel", min_width=80)
                position = gr.Textbox(
                    "", label="Position h, w (blank: sum)", info="conv layers: (N, C, H, W)", min_width=100
                )
                token = gr.Textbox(
                    "", label="Token (blank: sum)", info="transformer layers: (N, L, C); 0: class token", min_width=100
                )
            with gr.Row():
                run_btn = gr.Button("Run", variant="primary", elem_id="run")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Accordion("Gate", open=True):
                rules = gr.Dropdown(
                    list(RULES),
                    value="paper",
                    label="Rules",
                    info="semantic: ReLU, SiLU, GELU, max-pool, norm and attention rules for transformers",
                    elem_id="rules",
                )
                shape0, t0, pool0, detach0 = preset_fields("paper")
                shape = gr.Dropdown(list(GATE_SHAPES), value=shape0, label="Gate shape", elem_id="shape")
                temperature = gr.Slider(0.0, 3.0, value=t0, step=0.01, label="Temperature T", elem_id="temperature")
                pool_temperature = gr.Textbox(pool0, label="Max-pool T (blank: same as T)", elem_id="pool-temperature")
                pool_detach = gr.Checkbox(detach0, label="Detach max-pool softmax weights")
            with gr.Accordion("Ascent", open=False):
                steps = gr.Slider(0, 30, value=10, step=1, label="Steps")
                step_size = gr.Number(step0, label="Step size (L2)")
                eps = gr.Number(eps0, label="Radius eps (L2)")
            temperatures = gr.Textbox(DEFAULT_TEMPERATURES, label="Temperature strip (T values; 0 = vanilla)")
            m0 = MethodSettings(step_size=step0)
            with gr.Accordion("Method (a pullback variant, with the gate above)", open=False):
                method = gr.Dropdown(list(METHODS), value=m0.name, label="Method", elem_id="method")
                times_input = gr.Checkbox(m0.times_input, label="Times the input (x * map)")
                with gr.Row(equal_height=True):
                    method_steps = gr.Slider(0, 50, value=m0.steps, step=1, label="Ascent K", min_width=100)
                    method_step_size = gr.Number(m0.step_size, label="Ascent alpha (L2)", min_width=80)
                    method_clip = gr.Checkbox(m0.clip, label="Clip x_K to [-1, 1]", min_width=80)
                with gr.Row(equal_height=True):
                    samples = gr.Slider(1, 200, value=m0.samples, step=1, label="Noise samples", min_width=100)
                    noise = gr.Number(m0.noise, label="Input noise (std)", min_width=80)
                with gr.Row(equal_height=True):
                    weight_samples = gr.Slider(
                        1, 50, value=m0.weight_samples, step=1, label="Fusion weight samples", min_width=100
                    )
                    weight_noise = gr.Number(m0.weight_noise, label="Weight noise (x(1 + s u))", min_width=80)
                seed = gr.Number(m0.seed, precision=0, label="Noise seed")
        with gr.Column(scale=2):
            note = gr.Markdown("", elem_id="note")
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
            method_img = gr.Image(label="Method map", elem_id="out-method", format="png", height=240)
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
    return Layout(
        state=state,
        model_key=model_key,
        checkpoint=checkpoint,
        status=status,
        image=image,
        mode=mode,
        target_class=target_class,
        layer=layer,
        channel=channel,
        position=position,
        token=token,
        run_btn=run_btn,
        stop_btn=stop_btn,
        rules=rules,
        shape=shape,
        temperature=temperature,
        pool_temperature=pool_temperature,
        pool_detach=pool_detach,
        steps=steps,
        step_size=step_size,
        eps=eps,
        temperatures=temperatures,
        method=method,
        times_input=times_input,
        method_steps=method_steps,
        method_step_size=method_step_size,
        method_clip=method_clip,
        samples=samples,
        noise=noise,
        weight_samples=weight_samples,
        weight_noise=weight_noise,
        seed=seed,
        note=note,
        shown=shown,
        vanilla=vanilla,
        excitation=excitation,
        before=before,
        after_ex=after_ex,
        after_va=after_va,
        strip=strip,
        method_img=method_img,
        step=step,
        ex_img=ex_img,
        ex_diff=ex_diff,
        va_img=va_img,
        va_diff=va_diff,
        report=report,
        command=command,
        export_btn=export_btn,
        files=files,
    )
