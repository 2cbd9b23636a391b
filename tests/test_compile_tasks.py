"""Every task that builds its model with ``model.compile`` runs end to end on the digits CNN compiled by
``torch.compile`` (figures, evaluate; train and path_stability load checkpoints eagerly), with the eager
run's numbers.

The figures task takes K targets' pullbacks with one forward and backward pass per target when the model is
compiled: K backward passes through one forward (``retain_graph=True``) fail from the second batch on with
"This backward function was compiled with non-empty donated buffers ...".
"""

from __future__ import annotations

import pytest
import torch

from excitation_pullbacks.pipeline.run import run

from helpers import compose_config, read_rows

FIGURES = [
    "experiment=digits",
    "logger=csv",
    "figures=[fig2,fig3,fig4]",
    "ascent.steps=2",
    "temperatures=[0.3]",
    "batch_size=2",  # several batches: the failure came from the second
]
EVALUATE = [
    "experiment=evaluate_digits",
    "logger=csv",
    "evaluate.num_images=6",
    "batch_size=3",
    "evaluate.perturbation_steps=4",
    "evaluate.randomization_images=0",
    "evaluate.methods=[vanilla,excitation]",
    "temperatures=[0.3]",
    "ascent.steps=2",
]


@pytest.mark.slow  # torch.compile on the CPU: minutes on 2 cores
def test_figures_run_on_a_compiled_model_as_on_the_eager_one(tmp_path):
    compiled = run(compose_config(*FIGURES, "model.compile=true", f"output_dir={tmp_path / 'c'}"))["results"]
    eager = run(compose_config(*FIGURES, f"output_dir={tmp_path / 'e'}"))["results"]
    a = torch.load(compiled / "tensors.pt", weights_only=True)
    b = torch.load(eager / "tensors.pt", weights_only=True)
    for key in ("vanilla", "excitation", "exc_ascent", "van_ascent"):
        assert a[key].shape == b[key].shape
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), key


@pytest.mark.slow  # torch.compile on the CPU: minutes on 2 cores
def test_evaluate_runs_on_a_compiled_model_as_on_the_eager_one(tmp_path):
    compiled = run(compose_config(*EVALUATE, "model.compile=true", f"output_dir={tmp_path / 'c'}"))["results"]
    eager = run(compose_config(*EVALUATE, f"output_dir={tmp_path / 'e'}"))["results"]
    rows_c, rows_e = read_rows(compiled / "per_image.csv"), read_rows(eager / "per_image.csv")
    assert len(rows_c) == len(rows_e) == 12
    for rc, re in zip(rows_c, rows_e, strict=True):
        for key in ("deletion_auc", "insertion_auc", "map_tv", "ascent_gain"):
            if re[key] != "":
                assert float(rc[key]) == pytest.approx(float(re[key]), rel=1e-3, abs=1e-4), key
