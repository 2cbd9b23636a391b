"""The figures task's ``variants`` figure: pullback variants beside the excitation pullback, composed with Hydra's
compose API and run on the bundled digits CNN; each variant's maps in tensors.pt are those of the core variant
called directly."""

from __future__ import annotations

import csv

import pytest
import torch
from hydra.errors import ConfigCompositionException
from PIL import Image

from excitation_pullbacks import build_model
from excitation_pullbacks.pipeline.errors import PipelineError
from excitation_pullbacks.pipeline.run import run
from excitation_pullbacks.variants import make_variant

from helpers import compose_config

BASE = ["experiment=digits", "logger=none", "ascent=none", "targets.rows=[0,3]", "targets.extra=[]"]
OPTIONS = {  # the variants' options as the overrides below set them
    "smooth_pullback": dict(samples=3, noise=0.2, seed=5, draws_per_pass=1, batch_size=None),
    "pullback_ascent": dict(steps=2, step_size=3.0, eps=None, clip=True),
    "fusion_pullback": dict(
        weight_samples=2,
        input_samples=1,
        weight_noise=0.1,
        weight_noise_type="multiplicative",
        noise=0.2,
        seed=5,
        draws_per_pass=1,
        batch_size=None,
    ),
}
OVERRIDES = [
    "figures=[fig2,variants]",
    "variants.methods=[smooth_pullback,pullback_ascent,fusion_pullback]",
    "variants.smooth_samples=3",
    "variants.smooth_noise=0.2",
    "variants.seed=5",
    "variants.ascent_steps=2",
    "variants.ascent_step_size=3.0",
    "variants.fusion_weight_samples=2",
    "variants.fusion_input_samples=1",
    "variants.fusion_noise=0.2",
]


def _direct(name: str, times_input: bool, images: torch.Tensor, columns: list[int]) -> torch.Tensor:
    """The variant's maps called directly at the run's gates (sigmoid, T = 0.3): (N, K, C, H, W)."""
    model = build_model("digits_cnn")
    explain = make_variant(name, times_input=times_input, schedule=0.3, **OPTIONS[name])
    t = torch.tensor(columns).expand(images.shape[0], -1)
    return torch.stack([explain(model, images, t[:, k]) for k in range(t.shape[1])], 1)


def test_variants_figure_holds_the_core_variants(tmp_path):
    results = run(compose_config(*BASE, *OVERRIDES, f"output_dir={tmp_path}"))["results"]
    tensors = torch.load(results / "tensors.pt", weights_only=True)
    names = list(OPTIONS)
    assert tensors["variant_names"] == names
    images, columns = tensors["images"], tensors["columns"].tolist()
    assert tensors["variants"].shape == (2, 3, 2, *images.shape[1:])
    for v, name in enumerate(names):
        assert torch.equal(tensors["variants"][:, v], _direct(name, False, images, columns)), name
    with Image.open(results / "variants.png") as im:  # a panel per variant and the excitation pullback
        assert im.height > 4 * im.width / 3
    with open(results / "metrics_table.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f) if r["method"] in names}
    assert list(rows) == names and all(
        r["temperature"] == "0.3" and r.get("logit_after", "") == "" for r in rows.values()
    )


def test_input_times_variant(tmp_path):
    overrides = ["figures=[variants]", "variants.methods=[pullback_ascent]", "variants.times_input=true"]
    overrides += ["variants.ascent_steps=2", "variants.ascent_step_size=3.0"]
    results = run(compose_config(*BASE, *overrides, f"output_dir={tmp_path}"))["results"]
    tensors = torch.load(results / "tensors.pt", weights_only=True)
    expected = _direct("pullback_ascent", True, tensors["images"], tensors["columns"].tolist())
    assert torch.equal(tensors["variants"][:, 0], expected)


def test_unset_variants_leave_the_outputs_as_they_were(tmp_path):
    cfg = compose_config(*BASE, "figures=[fig2]", f"output_dir={tmp_path}")
    assert list(cfg.variants.methods) == []
    results = run(cfg)["results"]
    assert not (results / "variants.png").exists()
    assert "variants" not in torch.load(results / "tensors.pt", weights_only=True)


@pytest.mark.parametrize(
    "override", ["variants.methods=[smoothgrad]", "variants.fusion_weight_noise_type=gaussian", "variants.seed=x"]
)
def test_a_wrong_variant_fails_at_compose(override):
    with pytest.raises(ConfigCompositionException):
        compose_config(*BASE, override)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["variants.methods=[]"], "needs variants.methods"),
        (["variants.methods=[smooth_pullback]", "variants.smooth_samples=0"], "samples must be an integer >= 1"),
        (["variants.methods=[pullback_ascent,pullback_ascent]"], "twice"),
    ],
)
def test_bad_variant_options_fail_before_running(tmp_path, overrides, message):
    cfg = compose_config(*BASE, "figures=[variants]", *overrides, f"output_dir={tmp_path}")
    with pytest.raises(PipelineError, match=message):
        run(cfg)
    assert not (tmp_path / "results").exists()


def test_variant_explainers_survive_pickling_as_a_spawned_worker_gets_them():
    """A spawned DDP worker receives the module's explain functions pickled: the same maps after the round
    trip (the core's closures are rebuilt from their recipe)."""
    import pickle

    from excitation_pullbacks.models import digits_images
    from excitation_pullbacks.pipeline.variant_settings import variant_explainers

    cfg = compose_config(*BASE, *OVERRIDES)
    explainers = variant_explainers(cfg.variants, None)
    copies = pickle.loads(pickle.dumps(explainers))
    model = build_model("digits_cnn").eval()
    x, y = digits_images("test", 32)
    x, y = x[:2], y[:2]
    for name, explain in explainers.items():
        assert torch.equal(copies[name](model, x, y), explain(model, x, y)), name
