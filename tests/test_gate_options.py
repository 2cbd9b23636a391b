"""One gate type: the core's GateOptions, the pipeline's gate config and the presets agree field by field."""

from dataclasses import fields

import pytest
from hydra import compose, initialize_config_dir

from excitation_pullbacks import PRESETS, GateOptions, preset
from excitation_pullbacks.gates import NORM_SHAPES, RELU_SHAPES
from excitation_pullbacks.options import COMPAT
from excitation_pullbacks.pipeline.config import CONFIG_DIR, Compat, GateConfig, GateShape, NormShape
from excitation_pullbacks.pipeline.schedules import gate_options


def _gate(name):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        return compose("config", overrides=[f"gate={name}"]).gate


def test_config_fields_are_the_core_fields():
    core = {f.name for f in fields(GateOptions)} - {"gate"}
    config = {f.name for f in fields(GateConfig)} - {"shape", "kind"}
    assert core <= config, core - config
    assert [m.value for m in GateShape] == list(RELU_SHAPES)
    assert [m.value for m in NormShape] == list(NORM_SHAPES)
    assert [m.value for m in Compat] == list(COMPAT)


@pytest.mark.parametrize("name", ["author", "semantic", "semantic_author"])
def test_config_presets_are_the_core_presets(name):
    gate = _gate(name)
    assert gate_options(gate, gate.temperature) == PRESETS[name]
    assert gate_options(_gate("sigmoid"), 0.3) == PRESETS["paper"] == GateOptions()


def test_options_are_validated_once_where_made():
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        GateOptions(temperature=-1.0)
    with pytest.raises(ValueError, match="unknown norm gate"):
        preset("semantic", norm="soft")
    with pytest.raises(ValueError, match="unknown gate preset"):
        preset("papers")
