"""The explorer served on a local port and driven through gradio_client's named endpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


#: The method panel's values (soft_pullback; K, alpha, clip, samples, noise, weight samples, weight noise, seed).
METHOD = ("soft_pullback", False, 5, 2.857, True, 10, 0.15, 10, 0.1, 0)


def run_args(
    path, temperature=0.3, target="digit 3 (3)", mode="class", rules="paper", shape="sigmoid", pool="", method=METHOD
):
    """/run's values by position: model, checkpoint, image, target, gate, ascent, strip, method."""
    return (
        "digits_cnn|DEFAULT",
        "",
        gradio_client.handle_file(str(path)),
        mode,
        target,
        "features.6",
        2,
        "",
        "",
        rules,
        shape,
        temperature,
        pool,
        False,
        3,
        2.857,
        14.29,
        "0, 0.3, 1",
        *method,
    )


def test_named_endpoints_run_step_export(served_app):
    url, files = served_app
    client = gradio_client.Client(url, verbose=False)
    assert {"/run", "/step", "/export", "/load_model", "/stop"} <= set(
        client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    )
    out = client.predict(*run_args(files[3]), api_name="/run")
    (
        note,
        shown,
        vanilla,
        excitation,
        before,
        after_ex,
        _,
        strip,
        method,
        step,
        ex,
        ex_diff,
        va,
        va_diff,
        report,
        command,
    ) = out
    assert note == "Input 03_digit_3.png: 32 x 32, mode L; method map: soft_pullback()"
    for p in (shown, vanilla, excitation, strip, method, ex, ex_diff, va, va_diff):
        assert Path(p).is_file()
    assert before["label"] == "digit 3 (3)" and after_ex["label"] == "digit 3 (3)"
    assert step["maximum"] == 3
    assert "3 ReLU at 3 sites" in report
    assert "model=digits_cnn" in command and "'targets.rows=[3]'" in command
    other = client.predict(*run_args(files[3], temperature=1.5), api_name="/run")
    assert Path(other[3]).read_bytes() != Path(excitation).read_bytes()  # the pullback panel follows T
    assert Path(other[2]).read_bytes() == Path(vanilla).read_bytes()  # the vanilla panel does not
    first = client.predict(0, api_name="/step")
    assert Path(first[0]).read_bytes() == Path(shown).read_bytes()  # step 0 is the input image
    exported = client.predict(3, api_name="/export")
    names = {Path(p).name for p in exported}
    assert {"vanilla_gradient.png", "excitation_pullback.png", "tensors.pt", "command.txt"} <= names
    neuron = client.predict(*run_args(files[3], mode="hidden neuron"), api_name="/run")
    assert Path(neuron[3]).is_file() and neuron[10] is None  # no ascent for a hidden neuron


def test_rules_presets_fill_the_gate_panel(served_app):
    url, files = served_app
    client = gradio_client.Client(url, verbose=False)
    assert client.predict("semantic", api_name="/pick_rules") == ("normal_cdf", 0.6, "0.3", True)
    assert client.predict("paper", api_name="/pick_rules") == ("sigmoid", 0.3, "", False)
    out = client.predict(*run_args(files[3], 0.6, rules="semantic", shape="normal_cdf", pool="0.3"), api_name="/run")
    command = out[-1]
    assert "gate=semantic gate.shape=normal_cdf gate.temperature=0.6 gate.pool_temperature=0.3" in command
    paper = client.predict(*run_args(files[3], 0.6, shape="normal_cdf", pool="0.3"), api_name="/run")
    assert "gate=normal_cdf gate.temperature=0.6" in paper[-1]
    with pytest.raises(gradio_client.exceptions.AppError, match="give a position"):
        client.predict(*run_args(files[3], mode="hidden neuron")[:8], "0", *run_args(files[3])[9:], api_name="/run")


def test_bad_upload_is_a_clear_error(served_app, tmp_path):
    url, files = served_app
    client = gradio_client.Client(url, verbose=False)
    bad = tmp_path / "photo.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(gradio_client.exceptions.AppError, match="not an image file"):
        client.predict(*run_args(bad), api_name="/run")
    good = files[0]
    with pytest.raises(gradio_client.exceptions.AppError, match="not in the list of choices"):
        client.predict(*run_args(good, target="zebra"), api_name="/run")


RUN_PARAMETERS = [
    "Model",
    "Local checkpoint (state dict; optional)",
    "Image",
    "Target",
    "Class (type to filter)",
    "Layer (gated site)",
    "Channel",
    "Position h, w (blank: sum)",
    "Token (blank: sum)",
    "Rules",
    "Gate shape",
    "Temperature T",
    "Max-pool T (blank: same as T)",
    "Detach max-pool softmax weights",
    "Steps",
    "Step size (L2)",
    "Radius eps (L2)",
    "Temperature strip (T values; 0 = vanilla)",
    "Method",
    "Times the input (x * map)",
    "Ascent K",
    "Ascent alpha (L2)",
    "Clip x_K to [-1, 1]",
    "Noise samples",
    "Input noise (std)",
    "Fusion weight samples",
    "Weight noise (x(1 + s u))",
    "Noise seed",
]


def test_endpoint_parameters_keep_their_order(served_app):
    """API clients pass /run's values by position: the order is the page's, whatever the handlers read."""
    url, _ = served_app
    api = gradio_client.Client(url, verbose=False).view_api(print_info=False, return_format="dict")
    endpoints = api["named_endpoints"]
    assert [p["label"] for p in endpoints["/run"]["parameters"]] == RUN_PARAMETERS
    assert [p["label"] for p in endpoints["/pick_image"]["parameters"]] == RUN_PARAMETERS[:3]
    assert [p["label"] for p in endpoints["/step"]["parameters"]] == ["Ascent step"]


def test_load_model_and_pick_image(served_app):
    url, files = served_app
    client = gradio_client.Client(url, verbose=False)
    status, _, layer, step_size, eps, alpha = client.predict("digits_cnn|null", "", api_name="/load_model")
    assert status == "**digits_cnn: random weights** on cpu: 10 classes, input 32 x 32, 6 gated calls"
    assert layer["value"] == "features.2" and (step_size, eps, alpha) == (2.857, 14.29, 2.857)
    target = client.predict("digits_cnn|DEFAULT", "", gradio_client.handle_file(str(files[7])), api_name="/pick_image")
    assert target["value"] == "digit 7 (7)"
    with pytest.raises(gradio_client.exceptions.AppError, match="is not offered by this explorer"):
        client.predict("digits_cnn|DEFAULT", "/no/such/weights.pt", api_name="/load_model")


def test_queue_keeps_no_event_analytics(tmp_path):
    """Gradio's queue keeps no record of past events and builds no summary of them after each event (its tables
    grew the server's memory with every request served)."""
    from excitation_pullbacks.app.models import ModelSpec
    from excitation_pullbacks.app.page import build_demo

    from helpers import serving

    demo = build_demo(ModelSpec("digits_cnn", "DEFAULT"), device="cpu", work_dir=tmp_path)
    queue, summaries = demo._queue, []
    build = queue._get_df
    queue._get_df = lambda records: summaries.append(len(records)) or build(records)
    with serving(demo) as url:
        client = gradio_client.Client(url, verbose=False)
        for rules in ("semantic", "paper", "semantic", "paper"):
            client.predict(rules, api_name="/pick_rules")
    assert summaries == [] and len(queue.event_analytics) == 1
