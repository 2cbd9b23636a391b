"""The explorer's functions called directly: panels equal the core's results, inputs are checked."""

from __future__ import annotations

import shlex

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gradio")

from excitation_pullbacks import GateOptions, Neuron, ascent, preset, pullback
from excitation_pullbacks.app import images, panels, replays
from excitation_pullbacks.app.command import command_line
from excitation_pullbacks.app.inputs import (
    RULES,
    parse_pool_temperature,
    parse_position,
    parse_temperatures,
    parse_token,
    preset_fields,
    rules_gate,
    target_neuron,
)
from excitation_pullbacks.app.models import (
    ModelError,
    ModelSpec,
    load_model,
    loaded_model,
    output_layout,
    spec_from_key,
)
from excitation_pullbacks.models import randomize_zero_heads
from excitation_pullbacks.pipeline.schedules import gate_options

from helpers import compose_config


@pytest.fixture(scope="module")
def digits():
    return load_model(ModelSpec("digits_cnn", "DEFAULT"), "cpu")


@pytest.fixture(scope="module")
def x(digits, tmp_path_factory):
    folder = images.digits_folder(tmp_path_factory.mktemp("digits"), per_class=1)
    path = images.list_images(folder)[3]
    assert images.image_label(path) == "digit 3"
    return images.preprocess(images.open_image(path), digits.resize, digits.crop)


def test_a_gate_the_page_keeps_using_is_replayed_with_the_cores_numbers(digits, x, monkeypatch):
    monkeypatch.setattr(replays, "WARMUP", 2)
    gate = GateOptions(temperature=0.37)  # a gate no other test used: its replay starts now
    expected = pullback(digits.model, x, 3, gate)
    for call in range(4):
        grads = panels.gradients(digits.model, x, 3, gate)
        assert torch.equal(grads["excitation"], expected)
        assert replays.replay_of(digits.model, gate).replayed == (call >= 2)
    assert torch.equal(grads["vanilla"], pullback(digits.model, x, 3, temperature=0.0))


def test_model_is_cached_and_describes_its_sites(digits):
    assert load_model(ModelSpec("digits_cnn", "DEFAULT"), "cpu") is digits
    assert digits.space == "digits" and digits.classes[3] == "digit 3" and (digits.resize, digits.crop) == (32, 32)
    assert dict(digits.sites) == {f"features.{i}": 1 for i in (2, 6, 10, 3, 7, 11)}
    assert spec_from_key("resnet50|null") == ModelSpec("resnet50", None)
    assert spec_from_key("resnet50|IMAGENET1K_V1", "/w.pt") == ModelSpec("resnet50", None, "/w.pt")


def test_describing_a_model_leaves_its_forward_alone():
    """The probe that finds a model's sites records each module's first output without replacing the later
    ones: a Bottleneck's ReLU is called on 64, 64 and 256 channels (before, its first output came back at
    every call and ResNet50 did not load)."""
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(0)
    model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10).eval()
    probe = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(probe)
    loaded = loaded_model(ModelSpec("resnet_tiny", None), model, "cpu", "imagenet", 32, 32)
    assert dict(loaded.sites)["layer1.0.relu"] == 3 and loaded.shapes["layer1.0.relu"] == (1, 64, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.model(probe), expected)


def test_model_errors_are_one_line_messages(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(ModelSpec("digits_cnn", None, str(tmp_path / "missing.pt")), "cpu")
    with pytest.raises(ModelError, match="unknown model"):
        load_model(ModelSpec("no_such_net", None), "cpu")


def test_panels_equal_the_core(digits, x):
    gate = GateOptions(temperature=0.3, gate="sigmoid", pool_temperature=0.5, pool_detach=True)
    grads = panels.gradients(digits.model, x, 3, gate)
    assert x.shape == (1, 3, 32, 32) and -1 <= x.min() and x.max() <= 1
    torch.testing.assert_close(
        grads["excitation"],
        pullback(digits.model, x, 3, temperature=0.3, gate="sigmoid", pool_temperature=0.5, pool_detach=True),
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(
        grads["vanilla"], pullback(digits.model, x, 3, temperature=0.0, gate="hard"), rtol=0, atol=0
    )
    xr = x.clone().requires_grad_(True)
    digits.model(xr)[0, 3].backward()
    torch.testing.assert_close(grads["vanilla"], xr.grad)  # the vanilla panel is the autograd input gradient
    assert not torch.allclose(grads["excitation"], grads["vanilla"])


def test_panels_change_with_temperature(digits, x):
    temps = [0, 0.1, 1.0]
    strip = panels.temperature_strip(digits.model, x, 3, GateOptions(), temps)
    assert strip.shape == (3, 3, 32, 32)
    torch.testing.assert_close(strip[2:], pullback(digits.model, x, 3, temperature=1.0), rtol=0, atol=0)
    torch.testing.assert_close(strip[:1], pullback(digits.model, x, 3, temperature=0.0, gate="hard"), rtol=0, atol=0)
    a, b = (np.asarray(panels.render_map(strip[i])) for i in (1, 2))
    assert a.shape == (224, 224, 3) and np.abs(a.astype(int) - b).mean() > 1
    im = panels.render_strip(strip, temps, size=64)
    assert im.size == (3 * 64 + 2 * 4, 64 + 18)


def test_hidden_neuron_panel(digits, x):
    neuron = Neuron("features.6", 5, (4, 4))
    grads = panels.gradients(digits.model, x, neuron, GateOptions())
    torch.testing.assert_close(grads["excitation"], pullback(digits.model, x, neuron), rtol=0, atol=0)


def test_trajectories_equal_the_core_ascent(digits, x):
    gate, settings = GateOptions(temperature=0.5), panels.AscentSettings(3, 2.857, 14.29)
    ticks = []
    traj = panels.trajectories(digits.model, x, 7, gate, settings, ticks.append)
    assert ticks == ["excitation"] * 3 + ["vanilla"] * 3
    _, ex = ascent(digits.model, x, 7, steps=3, step_size=2.857, eps=14.29, temperature=0.5, return_trajectory=True)
    _, va = ascent(digits.model, x, 7, steps=3, step_size=2.857, eps=14.29, vanilla=True, return_trajectory=True)
    torch.testing.assert_close(traj["excitation"], ex[:, 0])
    torch.testing.assert_close(traj["vanilla"], va[:, 0])
    perturbed, diff = panels.step_views(traj["excitation"], 3)
    assert perturbed.size == diff.size == (224, 224)

    def stop(what):
        raise panels.Cancelled("stopped")

    with pytest.raises(panels.Cancelled):
        panels.trajectories(digits.model, x, 7, gate, settings, stop)


def test_explore_collects_every_panel(digits, x):
    result = panels.explore(
        digits.model, x, 3, digits.classes, GateOptions(), panels.AscentSettings(2, 2.857, 14.29), [0.3]
    )
    assert next(iter(result.before)) == "digit 3 (3)" and 0.5 < result.before["digit 3 (3)"] <= 1
    assert set(result.after) == {"excitation", "vanilla"} and result.trajectories["vanilla"].shape == (3, 3, 32, 32)
    assert "3 ReLU at 3 sites, 3 max-pool at 3 sites" in result.report


@pytest.mark.parametrize("mode", ["I;16", "F", "P", "LA", "CMYK", "RGBA", "1", "I"])
def test_odd_modes_keep_their_range(mode, tmp_path):
    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    if mode == "I;16":
        im = Image.fromarray((ramp * 65535).astype("<u2"))
        assert im.mode == "I;16"
        path = tmp_path / "a.png"
    elif mode == "F":
        im = Image.fromarray(ramp.astype(np.float32), "F")
        path = tmp_path / "a.tif"
    elif mode == "I":
        im = Image.fromarray((ramp * 4095).astype(np.int32), "I")
        path = tmp_path / "a.tif"
    elif mode == "CMYK":
        im = Image.fromarray((ramp * 255).astype(np.uint8)).convert("CMYK")
        path = tmp_path / "a.jpg"
    else:
        im = Image.fromarray((ramp * 255).astype(np.uint8)).convert(mode)
        path = tmp_path / ("a.png" if mode != "1" else "a.bmp")
    im.save(path)
    rgb = images.open_image(path)
    a = np.asarray(rgb).astype(int)
    assert rgb.mode == "RGB" and rgb.size == (64, 64)
    if mode != "1":  # a ramp keeps its range, neither clipped to white nor to black
        assert a[0, 0].max() < 40 and a[-1, -1].min() > 215 and len(np.unique(a[..., 0])) > 50


def test_bad_images_get_clear_messages(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(images.ImageError, match="not an image file"):
        images.open_image(text)
    bomb = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(bomb)  # 81 megapixels in a small file
    with pytest.raises(images.ImageError, match="too large|decompression bomb"):
        images.open_image(bomb)
    truncated = tmp_path / "cut.jpg"
    Image.new("RGB", (64, 64), "red").save(tmp_path / "full.jpg")
    truncated.write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
    with pytest.raises(images.ImageError, match="cannot read image"):
        images.open_image(truncated)
    nan = tmp_path / "nan.tif"
    Image.fromarray(np.full((8, 8), np.nan, np.float32), "F").save(nan)
    with pytest.raises(images.ImageError, match="NaN"):
        images.open_image(nan)
    with pytest.raises(images.ImageError, match="no image"):
        images.open_image(None)


def test_preprocessing_resizes_and_crops():
    im = Image.new("RGB", (300, 200), (255, 0, 0))
    x = images.preprocess(im, 256, 224)
    assert x.shape == (1, 3, 224, 224)
    torch.testing.assert_close(x[0, :, 100, 100], torch.tensor([1.0, -1.0, -1.0]))


def test_widget_parsers():
    assert parse_temperatures("0, 0.1 0.3") == [0.0, 0.1, 0.3]
    for bad in ("", "a, b", "-1", "1,2,3,4,5,6,7,8,9"):
        with pytest.raises(ValueError):
            parse_temperatures(bad)
    assert parse_position("") is None and parse_position("(3, 4)") == (3, 4)
    with pytest.raises(ValueError, match="position"):
        parse_position("3")
    assert parse_pool_temperature(" ") is None and parse_pool_temperature("0.5") == 0.5
    with pytest.raises(ValueError):
        parse_pool_temperature("-1")


def test_command_line_names_every_setting():
    line = command_line(
        ModelSpec("resnet50", None),
        gate=GateOptions(temperature=0.6, gate="normal_cdf_tanh", pool_detach=True),
        ascent=panels.AscentSettings(5, 20, 100),
        data_root="/d",
        resize=256,
        crop=224,
        image_class=0,
        target_class=482,
    )
    for part in (
        "pullbacks model=resnet50 model.weights=null",
        "data=folder data.root=/d",
        "gate.shape=normal_cdf_tanh",
        "gate.temperature=0.6",
        "gate.pool_temperature=null",
        "gate.pool_detach=true",
        "ascent.steps=5",
        "ascent.step_size=20",
        "ascent.eps=100",
        "targets=custom",
        "'targets.rows=[0]'",
        "'targets.extra=[482]'",
    ):
        assert part in line, part


def test_cli_reports_a_bad_model_in_one_line(tmp_path, capsys):
    from excitation_pullbacks.app.cli import main, parse_args

    args = parse_args(["--model", "resnet50", "--weights", "null", "--port", "7999"])
    assert (args.model, args.weights, args.port, args.device) == ("resnet50", "null", 7999, "auto")
    with pytest.raises(SystemExit, match="error: checkpoint .*missing.pt does not exist"):
        main(["--checkpoint", str(tmp_path / "missing.pt")])


# -- transformers: the Rules presets, token neurons, the exported command ---------------------------------------


@pytest.fixture(scope="module")
def vit():
    """A tiny torchvision ViT (32 px, patches of 8: 16 tokens + the class token, width 16) as the explorer
    describes it; its head starts at zero (every gradient would be 0): random weights instead."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10)
    randomize_zero_heads(model, std=0.5)
    return loaded_model(ModelSpec("vit_tiny", None), model, "cpu", "imagenet", 32, 32)


@pytest.fixture(scope="module")
def vx():
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1


@pytest.mark.parametrize("name", RULES)
def test_rules_fields_show_the_preset(name):
    """The fields a preset puts in the gate panel give back the preset."""
    gate = rules_gate(name, *preset_fields(name))
    if preset(name).pool_detach is None:  # "no, except compat=semantic_author" (documented), read as a checkbox
        assert gate == preset(name).replace(pool_detach=False) and preset(name).compat != "semantic_author"
    else:
        assert gate == preset(name)
    assert preset_fields("semantic") == ("normal_cdf", 0.6, "0.3", True)
    changed = rules_gate("semantic", "sigmoid", 0.4, "", False)
    assert changed == preset("semantic").replace(
        temperature=0.4, gate="sigmoid", pool_temperature=None, pool_detach=False
    )
    with pytest.raises(ValueError, match="unknown rules"):
        rules_gate("vanilla", "hard", 0, "", False)


def test_semantic_pullback_of_a_vit_is_the_core(vit, vx):
    assert vit.kinds == ("norm", "attention", "gelu") and set(vit.layouts.values()) == {"tokens"}
    assert "encoder.layers.encoder_layer_0.self_attention" not in vit.layers  # a tuple output: no neuron target
    gate = rules_gate("semantic", *preset_fields("semantic"))
    grads = panels.gradients(vit.model, vx, 3, gate)
    torch.testing.assert_close(grads["excitation"], pullback(vit.model, vx, 3, preset("semantic")), rtol=0, atol=0)
    xr = vx.clone().requires_grad_(True)
    vit.model(xr)[0, 3].backward()
    torch.testing.assert_close(grads["vanilla"], xr.grad)
    assert not torch.allclose(grads["excitation"], grads["vanilla"])
    report = panels.call_site_report(vit.model, vx, gate)
    assert report.splitlines()[0] == (
        "gated calls per forward: 5 norm at 5 sites, 2 attention at 2 sites, 2 GELU at 2 sites (1 forward passes)"
    )
    assert "  attention  encoder.layers.encoder_layer_1.self_attention" in report.splitlines()


def test_token_neuron_of_a_vit(vit, vx):
    layer = "encoder.layers.encoder_layer_1.mlp.1"
    assert vit.shapes[layer] == (1, 17, 32) and vit.layouts[layer] == "tokens"
    neuron = target_neuron(vit, layer, 5, "", "0")
    assert neuron == Neuron(layer, 5, None, layout="tokens", token=0)
    grads = panels.gradients(vit.model, vx, neuron, preset("semantic"))
    torch.testing.assert_close(grads["excitation"], pullback(vit.model, vx, neuron, preset("semantic")), rtol=0, atol=0)
    outputs = []
    hook = dict(vit.model.named_modules())[layer].register_forward_hook(lambda m, i, o: outputs.append(o))
    xr = vx.clone().requires_grad_(True)
    try:
        vit.model(xr)
    finally:
        hook.remove()
    outputs[0][0, 0, 5].backward()  # the class token's unit 5, by autograd
    torch.testing.assert_close(grads["vanilla"], xr.grad)
    summed = panels.gradients(vit.model, vx, target_neuron(vit, layer, 5, "", ""), preset("semantic"))
    assert not torch.allclose(summed["excitation"], grads["excitation"])
    with pytest.raises(ValueError, match="give a token"):
        target_neuron(vit, layer, 5, "1, 2", "")
    with pytest.raises(ValueError, match="token must be a whole number"):
        parse_token("cls")


def test_layouts_of_layer_outputs(digits):
    assert output_layout((1, 197, 768)) == "tokens"
    assert output_layout((1, 96, 56, 56)) == "channels_first" and output_layout((1, 56, 56, 96)) == "channels_last"
    assert set(digits.layouts.values()) == {"channels_first"}
    with pytest.raises(ValueError, match="give a position"):
        target_neuron(digits, "features.6", 5, "", "0")
    assert target_neuron(digits, "features.6", 5, "4, 4", "") == Neuron(
        "features.6", 5, (4, 4), layout="channels_first"
    )


@pytest.mark.parametrize(
    ("rules", "fields"),
    [
        ("semantic", None),
        ("semantic", ("sigmoid", 0.45, "0.2", False)),
        ("semantic_author", None),
        ("author", ("softsign", 1.5, "", True)),
        ("paper", ("normal_cdf_tanh", 0.6, "0", False)),
        ("paper", None),
    ],
)
def test_exported_command_composes_to_the_same_gate(rules, fields):
    """The command line the page shows, split as a shell splits it and composed with Hydra as the CLI does,
    gives the run's model and GateOptions."""
    gate = rules_gate(rules, *(fields or preset_fields(rules)))
    line = command_line(
        ModelSpec("vit_b_16", None),
        gate=gate,
        rules=rules,
        ascent=panels.AscentSettings(5, 20, 100),
        data_root="input",
        resize=256,
        crop=224,
        image_class=1,
        target_class=482,
    )
    program, *overrides = shlex.split(line)
    assert program == "pullbacks" and (f"gate={rules}" in overrides) == (rules != "paper")
    cfg = compose_config(*overrides)
    assert cfg.model.name == "vit_b_16" and cfg.model.weights is None and list(cfg.targets.extra) == [482]
    assert gate_options(cfg.gate, cfg.gate.temperature) == gate
