"""Command line: ``pullbacks [overrides]`` (Hydra) -> :func:`excitation_pullbacks.pipeline.job.run`.

The configs live in ``conf/`` at the repository root (an editable install); set
``EXCITATION_PULLBACKS_CONF`` to use another config directory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from excitation_pullbacks.models import WeightsUnavailableError

from .errors import PipelineError
from .job import report, run

__all__ = ["CONFIG_DIR", "main"]

#: conf/ at the repository root: src/excitation_pullbacks/pipeline/cli.py -> parents[3].
CONFIG_DIR = str(Path(os.environ.get("EXCITATION_PULLBACKS_CONF", Path(__file__).resolve().parents[3] / "conf")))

EXPECTED = (PipelineError, WeightsUnavailableError, ValueError, OSError, KeyError, OmegaConfBaseException)


def _message(err: BaseException) -> str:
    text = " ".join(str(err.args[0] if isinstance(err, KeyError) and err.args else err).split())
    return text or type(err).__name__


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base=None)
def _main(cfg: DictConfig) -> None:
    try:
        result = run(cfg)
    except EXPECTED as err:
        print(f"error: {_message(err)}", file=sys.stderr)
        sys.exit(1)
    if result["results"] is not None:
        report(result)


def main() -> None:
    """Console entry point."""
    if not Path(CONFIG_DIR, "config.yaml").is_file():
        print(f"error: no config.yaml in {CONFIG_DIR}; set EXCITATION_PULLBACKS_CONF to the conf/ folder",
              file=sys.stderr)
        sys.exit(1)
    _main()


if __name__ == "__main__":
    main()
