"""The explorer's Method panel: each pullback variant, with the gate panel's gate, gives exactly what the core's
variant gives when called directly - through the page's event functions and through a served page."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]

from excitation_pullbacks import Neuron, make_variant
from excitation_pullbacks.app.checkpoints import Checkpoints
from excitation_pullbacks.app.events import Events, RunInputs
from excitation_pullbacks.app.images import digits_folder, list_images, open_image, preprocess
from excitation_pullbacks.app.inputs import rules_gate
from excitation_pullbacks.app.layout import build_layout
from excitation_pullbacks.app.methods import MethodSettings, method_map
from excitation_pullbacks.app.models import ModelSpec, load_model
from excitation_pullbacks.app.panels import render_map

SPEC = ModelSpec("digits_cnn", "DEFAULT")


def values(image, **changes) -> dict:
    """A run's widget values by field name (:class:`RunInputs`): digit 3, semantic rules at T = 0.5, 1 ascent
    step, one strip temperature, the method soft_pullback; ``changes`` replace some."""
    v = {
        "model_key": SPEC.key,
        "checkpoint": "",
        "image": str(image),
        "mode": "class",
        "target_class": "digit 3 (3)",
        "layer": "features.6",
        "channel": 2,
        "position": "",
        "token": "",
        "rules": "semantic",
        "shape": "normal_cdf",
        "temperature": 0.5,
        "pool_temperature": "0.3",
        "pool_detach": True,
        "steps": 1,
        "step_size": 2.857,
        "eps": 14.29,
        "temperatures": "0.3",
        "method": "soft_pullback",
        "times_input": False,
        "method_steps": 5,
        "method_step_size": 2.857,
        "method_clip": True,
        "samples": 10,
        "noise": 0.15,
        "weight_samples": 10,
        "weight_noise": 0.1,
        "seed": 0,
    }
    v.update(changes)
    assert list(v) == list(RunInputs.__dataclass_fields__)  # the API's parameter order
    return v


class Request:
    session_hash = "test-session"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """(Events of a page built with the digits CNN, its Layout, the model, one test image per digit)."""
    loaded = load_model(SPEC, "cpu")
    files = list_images(digits_folder(tmp_path_factory.mktemp("digits"), per_class=1))
    with gr.Blocks() as demo:
        ui = build_layout(SPEC, [SPEC], loaded, [], [], "")
        events = Events(ui, SPEC, "cpu", tmp_path_factory.mktemp("work"), Checkpoints.offered(None, None))
        events.connect(demo)
    return events, ui, loaded, files


def run_page(events, ui, v: dict) -> dict:
    return events.run({getattr(ui, k): value for k, value in v.items()}, Request(), progress=lambda *a, **k: None)


def direct(loaded, path, v: dict, name: str, **options) -> torch.Tensor:
    """The variant called directly on the image as the pipeline reads it, with the gate the panel's fields name."""
    gate = rules_gate(v["rules"], v["shape"], v["temperature"], v["pool_temperature"], v["pool_detach"])
    x = preprocess(open_image(path), loaded.resize, loaded.crop)
    explain = make_variant(name, times_input=v["times_input"], schedule=gate, **options)
    return explain(loaded.model, x, torch.tensor([int(v["target_class"].split("(")[-1][:-1])]))


CASES = [
    ("soft_pullback", {}, {}),
    ("soft_pullback", {"times_input": True}, {}),
    ("pullback_ascent", {"method_steps": 3, "method_step_size": 1.5}, {"steps": 3, "step_size": 1.5, "clip": True}),
    (
        "pullback_ascent",
        {"method_steps": 2, "method_step_size": 40.0, "method_clip": False, "times_input": True},
        {"steps": 2, "step_size": 40.0, "clip": False},
    ),
    ("smooth_pullback", {"samples": 4, "noise": 0.2, "seed": 3}, {"samples": 4, "noise": 0.2, "seed": 3}),
    (
        "fusion_pullback",
        {"samples": 2, "weight_samples": 3, "noise": 0.1, "weight_noise": 0.05, "seed": 7},
        {"input_samples": 2, "weight_samples": 3, "noise": 0.1, "weight_noise": 0.05, "seed": 7},
    ),
]


@pytest.mark.parametrize(("name", "changes", "options"), CASES)
def test_method_map_is_the_variant(page, name, changes, options):
    events, ui, loaded, files = page
    v = values(files[3], method=name, **changes)
    out = run_page(events, ui, v)
    result = out[ui.state]["result"]
    expected = direct(loaded, files[3], v, name, **options)
    assert result.method.shape == (1, 3, 32, 32) and result.method.abs().sum() > 0
    assert torch.equal(result.method, expected)
    shown = Image.open(out[ui.method_img]).convert("RGB")  # a PNG file in the run's panels folder
    assert np.array_equal(np.asarray(shown), np.asarray(render_map(expected[0]).convert("RGB")))
    assert result.method_name.startswith("x * " if v["times_input"] else name)
    assert f"method map: {result.method_name}" in out[ui.note]
    if name == "pullback_ascent" and options["clip"]:  # x_0 + map stays in the image range
        assert (result.x + result.method).abs().max() <= 1
    if name == "soft_pullback" and not v["times_input"]:  # the pullback panel itself
        assert torch.equal(result.method, result.excitation)


def test_method_exports_and_settings_errors(page):
    events, ui, loaded, files = page
    v = values(files[5], target_class="digit 8 (8)", method="smooth_pullback", samples=3, seed=1)
    out = run_page(events, ui, v)
    exported = events.export({ui.state: out[ui.state], ui.step: 1})[ui.files]
    saved = torch.load(next(p for p in exported if p.endswith("tensors.pt")), weights_only=True)
    assert torch.equal(saved["method"], direct(loaded, files[5], v, "smooth_pullback", samples=3, noise=0.15, seed=1))
    assert saved["method_name"] == "smooth_pullback(samples=3, noise=0.15, seed=1)"
    assert any(Path(p).name == "method.png" for p in exported)
    for changes, message in (
        (
            {"method": "fusion_pullback", "weight_noise": -1},
            "fusion_pullback: weight_noise must be a finite number >= 0",
        ),
        ({"method": "no_such"}, "unknown method 'no_such'"),
        ({"method": "smooth_pullback", "mode": "hidden neuron"}, "needs a class target"),
        ({"method": "smooth_pullback", "samples": 2.5}, "samples must be a whole number"),
    ):
        with pytest.raises(gr.Error, match=message) as err:
            run_page(events, ui, values(files[5], **changes))
        assert "\n" not in str(err.value)


def test_a_hidden_neuron_takes_the_pullback(page):
    events, ui, loaded, files = page
    v = values(files[2], mode="hidden neuron", layer="features.6", channel=4, position="3, 2", times_input=True)
    result = run_page(events, ui, v)[ui.state]["result"]
    gate = rules_gate("semantic", "normal_cdf", 0.5, "0.3", True)
    x = preprocess(open_image(files[2]), 32, 32)
    expected = make_variant("soft_pullback", times_input=True, schedule=gate)(
        loaded.model, x, Neuron("features.6", 4, (3, 2), layout=loaded.layouts["features.6"])
    )
    assert torch.equal(result.method, expected)


def test_stop_ends_a_variant_at_a_forward_pass(page):
    _, _, loaded, files = page
    x = preprocess(open_image(files[1]), 32, 32)
    calls = []

    def should_stop():
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("stopped")

    settings = MethodSettings("fusion_pullback", samples=50, weight_samples=50)
    gate = rules_gate("paper", "sigmoid", 0.3, "", False)
    with pytest.raises(RuntimeError, match="stopped"):
        method_map(loaded.model, x, 1, settings, gate, should_stop)
    assert len(calls) == 4  # not 2500 pullbacks
    assert not loaded.model._forward_pre_hooks  # the hook is gone, the model as it was


def test_served_method_equals_the_variant(served_app):
    url, files = served_app
    loaded = load_model(SPEC, "cpu")
    client = gradio_client.Client(url, verbose=False)
    v = values(files[4], target_class="digit 9 (9)", method="pullback_ascent", method_steps=2, method_step_size=3.0)
    args = [gradio_client.handle_file(str(files[4])) if k == "image" else x for k, x in v.items()]
    out = client.predict(*args, api_name="/run")
    expected = direct(loaded, files[4], v, "pullback_ascent", steps=2, step_size=3.0, clip=True)
    method_png = out[8]
    assert np.array_equal(np.asarray(Image.open(method_png).convert("RGB")), np.asarray(render_map(expected[0])))
    exported = client.predict(1, api_name="/export")
    saved = torch.load(next(p for p in exported if p.endswith("tensors.pt")), weights_only=True)
    assert torch.equal(saved["method"], expected)
