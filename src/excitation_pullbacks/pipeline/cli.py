"""Command line: ``pullbacks [overrides]`` (Hydra) -> :func:`excitation_pullbacks.pipeline.run.run`.

The configs ship inside the package (:data:`~.config.CONFIG_DIR`); add your own with Hydra's search path
(``pullbacks --config-dir <dir> experiment=mine`` or ``hydra.searchpath=[file://<dir>]``).
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from excitation_pullbacks.models import WeightsUnavailableError
from excitation_pullbacks.stopping import Stopped

from .callbacks import JobRecord, jobs, overview_lines, record_job
from .config import CONFIG_DIR
from .errors import OtherRankFailed, PipelineError, describe_failure
from .outputs import check_directory, is_launcher
from .run import report, run
from .signals import exit_code, pass_on
from .terminal import say, tidy_logging

__all__ = ["CONFIG_DIR", "EXPECTED", "check_overrides", "main"]

EXPECTED = (PipelineError, WeightsUnavailableError, ValueError, OSError, KeyError, OmegaConfBaseException)


def _debug(cfg: DictConfig | None = None) -> bool:
    """Full tracebacks: ``HYDRA_FULL_ERROR=1`` or ``debug=true``."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or bool(cfg is not None and cfg.get("debug", False))


def _message(err: BaseException) -> str:
    text = " ".join(str(err.args[0] if isinstance(err, KeyError) and err.args else err).split())
    return text or type(err).__name__


def _job() -> tuple[int, str] | None:
    """(job number, overrides) of the multirun job running now; None outside a multirun."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hc = HydraConfig.get()
    return int(hc.job.num), " ".join(hc.overrides.task)


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base=None)
def _main(cfg: DictConfig) -> float | None:
    """One job; returns the evaluate task's objective (what the Optuna sweeper optimises), else None.

    Bad input: one ``error:`` line; alone it exits 1, in a multirun the job is noted as failed (objective NaN)
    and the others go on. A stop (SIGINT/SIGTERM) exits 128 + signal, in a multirun after the overview."""
    tidy_logging()
    job, started = _job(), time.perf_counter()

    def note(status: str, results: object, error: str = "") -> None:
        if job is not None:
            record_job(JobRecord(job[0], status, round(time.perf_counter() - started, 1), str(results), job[1], error))

    try:
        result = run(cfg)
    except Stopped as err:  # SIGINT / SIGTERM (/ a resume signal): one line, exit 128 + signal
        if is_launcher():  # DDP children stop with it and say nothing
            print(f"error: {_message(err)}", file=sys.stderr)
        if job is not None:
            note("stopped", HydraConfig.get().runtime.output_dir, _message(err))
            for line in overview_lines(jobs()):
                say(line)
        pass_on()  # a cluster launcher's own handler (submitit: requeue the job)
        _leave_process_group()
        sys.exit(exit_code())
    except Exception as err:
        if _debug(cfg):
            raise
        message = describe_failure(err, cfg.get("batch_size"), str(cfg.get("output_dir") or ""))
        if message is None and not isinstance(err, EXPECTED):
            raise
        if isinstance(err, OtherRankFailed) and not is_launcher():  # the failing process says what failed
            sys.exit(1)
        print(f"error: {message or _message(err)}", file=sys.stderr)
        if job is None:
            sys.exit(1)
        note("failed", HydraConfig.get().runtime.output_dir, message or _message(err))
        return math.nan
    if result["results"] is not None:
        report(result)
        note("skipped" if result.get("skipped") else "done", result["results"])
    return result.get("objective")


def _one_line(message: str) -> str:
    """Hydra's multi-line composition errors as one line (options listed inline, search path dropped)."""
    lines, options = [], []
    for line in message.splitlines():
        if line.startswith(("Config search path", "See https://hydra.cc")):
            break
        if line.startswith("\t"):
            options.append(line.strip())
        elif line.strip():
            lines.append(
                "- " + line.strip().rstrip(":").lower() if line.startswith("Available options") else line.strip()
            )
    text = " ".join(lines)
    return f"{text}: {', '.join(options)}" if options else text


def _sweep_values(override) -> list[str]:
    """``key=value`` for each value of a choice/range sweep; an interval (Optuna) sweep's two ends."""
    key = override.get_key_element()
    value = override.value()
    if isinstance(value, IntervalSweep):
        return [f"{key}={value.start}", f"{key}={value.end}"]
    return [f"{key}={v}" for v in override.sweep_string_iterator()]


def check_overrides(args: list[str]) -> str | None:
    """Compose the config for every value of the command-line overrides, as Hydra will.

    args: the command line after the program name. Returns a one-line error, or None when every
    composition works (or the line holds Hydra flags this check leaves to Hydra).
    """
    flags = [a for a in args if a.startswith("-")]
    if any(f not in ("-m", "--multirun") for f in flags):
        return None
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
        choices = [[o.input_line] if not o.is_sweep_override() else _sweep_values(o) for o in parsed]
        base = [c[0] for c in choices]  # the first value of every sweep, then each other value in turn
        combos = [base] + [base[:i] + [v] + base[i + 1 :] for i, c in enumerate(choices) for v in c[1:]]
        with initialize_config_dir(CONFIG_DIR, version_base=None):
            for overrides in combos:
                compose("config", overrides=overrides)
            hydra_cfg = compose("config", overrides=base, return_hydra_config=True)
    except Exception as err:  # parse and composition errors: Hydra would print the same, on several lines
        if type(err).__module__.startswith(("hydra", "omegaconf")):
            return _one_line(str(err))
        raise
    if flags and hydra_cfg.get("output_dir"):
        return "output_dir would be shared by every multirun job: leave it null (use hydra.sweep.dir)"
    return _run_dir_problem(hydra_cfg, multirun=bool(flags))


def _run_dir_problem(cfg: DictConfig, multirun: bool) -> str | None:
    """A one-line error when Hydra's run (or sweep) directory cannot be made because it or a folder above it
    is a file (Hydra would fail with a traceback); None otherwise or when the path cannot be told yet."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        path = OmegaConf.select(cfg, key)
    except OmegaConfBaseException:  # interpolations only Hydra's run can resolve
        return None
    if not path:
        return None
    try:
        check_directory(Path(os.path.expanduser(str(path))).absolute())
    except PipelineError as err:
        return f"{key}: {err}".replace("choose another output_dir", f"choose another {key}")
    return None


def _leave_process_group() -> None:
    """End the torch.distributed process group a DDP run left in this process, so that its threads end before
    the interpreter does: a stopped DDP launcher otherwise, now and then, aborted at exit ("terminate called
    without an active exception", SIGABRT) instead of exiting with 128 + the signal."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    """Console entry point."""
    problem = check_overrides(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(1)
    _main()


if __name__ == "__main__":
    main()
