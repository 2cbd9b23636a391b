"""Focus mosaics: seeded sampling from a labelled source, quadrant masks, Focus on input x attribution (equal to
Quantus's Focus on the same relevance), and the figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from excitation_pullbacks import metrics as M
from excitation_pullbacks.baselines import explainer
from excitation_pullbacks.models import digits_images, load_digits_cnn
from excitation_pullbacks.mosaics import focus_figure, focus_mosaics, input_relevance


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one intra-op thread (several threads on a busy machine only wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def source():
    x, y = digits_images("test", size=16)
    return x[:60], y[:60]


def test_mosaics_are_seeded_and_hold_the_target_twice(source):
    x, y = source
    m = focus_mosaics(x, y, 12, tile=16, seed=3)
    again = focus_mosaics(x, y, 12, tile=16, seed=3)
    assert torch.equal(m.images, again.images) and torch.equal(m.sources, again.sources)
    assert not torch.equal(m.sources, focus_mosaics(x, y, 12, tile=16, seed=4).sources)
    assert m.images.shape == (12, 3, 32, 32) and m.masks.shape == (12, 1, 32, 32)
    assert (m.quadrants.sum(1) == 2).all()
    for i in range(12):
        target = m.sources[i][m.quadrants[i].bool()]
        assert target[0] == target[1] and (y[target] == m.targets[i]).all()
        assert (m.labels[i][~m.quadrants[i].bool()] != m.targets[i]).all()
        for q in range(4):
            r, c = divmod(q, 2)
            tile = m.images[i, :, 16 * r : 16 * r + 16, 16 * c : 16 * c + 16]
            assert torch.equal(tile, x[m.sources[i, q]])  # already 16 px: no resize
            assert bool(m.masks[i, 0, 16 * r, 16 * c]) == bool(m.quadrants[i, q])


def test_tiles_are_resized_and_distractors_can_differ(source):
    x, y = source
    m = focus_mosaics(x, y, 5, tile=24, seed=0, distinct_distractors=True)
    assert m.images.shape == (5, 3, 48, 48)
    tile = F.interpolate(x[m.sources[0, 0]][None], size=(24, 24), mode="bilinear", antialias=True)
    torch.testing.assert_close(m.images[0, :, :24, :24], tile[0])
    distractors = m.labels[~m.quadrants.bool()].view(5, 2)
    assert (distractors[:, 0] != distractors[:, 1]).all()
    with pytest.raises(ValueError, match="classes"):
        focus_mosaics(x[y == y[0]], y[y == y[0]], 2)


def test_focus_scores_where_the_relevance_lies(source):
    x, y = source
    m = focus_mosaics(x, y, 4, tile=16, seed=1)
    inside = m.masks.expand(-1, 3, -1, -1).double()
    torch.testing.assert_close(M.focus(inside, m.quadrants), torch.ones(4, dtype=torch.float64), atol=1e-8, rtol=0)
    torch.testing.assert_close(
        M.focus(torch.ones_like(inside), m.quadrants), torch.full((4,), 0.5, dtype=torch.float64)
    )
    assert (M.focus(-inside, m.quadrants) == 0).all()  # negative relevance does not count


def test_focus_on_digits_mosaics_equals_quantus_and_draws_a_figure(source, tmp_path):
    quantus = pytest.importorskip("quantus")
    x, y = digits_images("test", size=32)
    m = focus_mosaics(x[:80], y[:80], 6, tile=32, seed=2)
    model = load_digits_cnn().eval()
    rel, scores = {}, {}
    for method in ("vanilla", "gradcam"):
        maps = explainer(method)(model, m.images, m.targets)
        rel[method] = input_relevance(m.images, maps)
        scores[method] = M.focus(rel[method], m.quadrants)
        theirs = quantus.Focus(abs=False, normalise=False, return_aggregate=False, disable_warnings=True)(
            model=model,
            x_batch=m.images.numpy(),
            y_batch=m.targets.numpy(),
            a_batch=rel[method].numpy(),
            custom_batch=m.quadrants.numpy(),
            channel_first=True,
        )
        np.testing.assert_allclose(scores[method].numpy(), np.asarray(theirs), rtol=1e-5, atol=1e-7)
    path = focus_figure(m, rel, tmp_path / "focus.png", scores=scores, rows=3)
    assert path.stat().st_size > 10_000
