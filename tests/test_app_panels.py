"""The explorer's functions called directly: panels equal the core's results, inputs are checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gradio")

from excitation_pullbacks import GateOptions, Neuron, ascent, pullback
from excitation_pullbacks.app import images, panels
from excitation_pullbacks.app.command import command_line
from excitation_pullbacks.app.inputs import parse_pool_temperature, parse_position, parse_temperatures
from excitation_pullbacks.app.models import ModelError, ModelSpec, load_model, spec_from_key


@pytest.fixture(scope="module")
def digits():
    return load_model(ModelSpec("digits_cnn", "DEFAULT"), "cpu")


@pytest.fixture(scope="module")
def x(digits, tmp_path_factory):
    folder = images.digits_folder(tmp_path_factory.mktemp("digits"), per_class=1)
    path = images.list_images(folder)[3]
    assert images.image_label(path) == "digit 3"
    return images.preprocess(images.open_image(path), digits.resize, digits.crop)


def test_model_is_cached_and_describes_its_sites(digits):
    assert load_model(ModelSpec("digits_cnn", "DEFAULT"), "cpu") is digits
    assert digits.space == "digits" and digits.classes[3] == "digit 3" and (digits.resize, digits.crop) == (32, 32)
    assert dict(digits.sites) == {f"features.{i}": 1 for i in (2, 6, 10, 3, 7, 11)}
    assert spec_from_key("resnet50|null") == ModelSpec("resnet50", None)
    assert spec_from_key("resnet50|IMAGENET1K_V1", "/w.pt") == ModelSpec("resnet50", None, "/w.pt")


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
