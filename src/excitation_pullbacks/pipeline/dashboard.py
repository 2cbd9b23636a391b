"""W&B as the run's dashboard (offline by default, no account needed).

The run is opened when the job starts - config, tags, job type and notes up front, so its runtime and system
metrics cover the work and a crash still leaves a run - and finished as what happened: finished, failed
(exit code 1) or stopped (128 + signal, tagged ``stopped``). Results go in as tables with T as a column and
as one record per temperature against a ``temperature`` x axis, so a workspace plots every metric against T.
The offline run lives in ``<output dir>/wandb/`` (beside ``results/``, kept when a run fails).

W&B's service writes the run file (``run-<id>.wandb``) in its own process and goes on when a write fails (a
full disk): it logs the failure and the file ends early. :meth:`Dashboard.check_written` reads the file back
after the run is finished, so that a run whose dashboard is incomplete fails instead of being published.
When the service process itself is gone (killed, crashed), every call to W&B fails with a lost connection: the
dashboard turns that into the same kind of one-line error, naming the run file, and lets go of W&B so that its
exit hook prints no traceback.
"""

from __future__ import annotations

import math
import os
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import wandb
from google.protobuf.message import DecodeError
from lightning.pytorch.loggers import WandbLogger
from PIL import Image
from wandb.proto import wandb_internal_pb2
from wandb.sdk import wandb_setup
from wandb.sdk.mailbox import HandleAbandonedError, MailboxClosedError

from .atomic import write_text
from .errors import DISK, PipelineError, cannot_write

__all__ = ["Dashboard", "run_records", "run_tags", "wandb_enabled"]

#: The x axis of the per-temperature records.
TEMPERATURE = "temperature"

# Read here because wandb (0.31) ships no Python reader of its run files (its Go service writes them).
# An offline run file: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of chunks, each with a
# 7-byte header (CRC32, length, type: 1 full, 2 first, 3 middle, 4 last) and a piece of a serialised
# ``wandb_internal_pb2.Record``; a block's last bytes too few for a chunk header are padding.
_BLOCK, _CHUNK_HEADER = 32768, 7

#: What W&B's calls raise once its service process is gone: the socket to it is closed.
_SERVICE_LOST = (ConnectionError, MailboxClosedError, HandleAbandonedError)


def run_records(path: str | os.PathLike) -> list:
    """Every Record in the offline run file ``path`` (``run-<id>.wandb``), in order.

    Raises ValueError when it is not a W&B run file, ends inside a record or holds a record that does not
    decode (a file whose writing stopped early)."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    records, parts, pos = [], [], 7
    while pos + _CHUNK_HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _CHUNK_HEADER])
        if kind == 0 and length == 0:
            pos += left
            continue
        end = pos + _CHUNK_HEADER + length
        if end > len(data):
            raise ValueError(f"{path} ends inside a record")
        parts.append(data[pos + _CHUNK_HEADER : end])
        pos = end
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(b"".join(parts))
            except DecodeError as err:
                raise ValueError(f"{path} holds a record that does not decode ({err})") from None
            records.append(record)
            parts = []
    if parts or (pos < len(data) and _BLOCK - pos % _BLOCK >= _CHUNK_HEADER):
        raise ValueError(f"{path} ends inside a record")
    return records


def _has_exit(path: Path) -> bool:
    """True when the run file ``path`` reads back whole up to the run's exit record."""
    try:
        return any(r.WhichOneof("record_type") == "exit" for r in run_records(path))
    except (OSError, ValueError):
        return False


def _logged_errors(folder: Path) -> list[str]:
    """The errors W&B's service logged for the run (``logs/debug-internal.log``, lower case; on a full disk that
    log may be cut short too)."""
    try:
        lines = (folder / "logs" / "debug-internal.log").read_text(errors="replace").lower().splitlines()
    except OSError:
        return []
    return [line for line in lines if '"level":"error"' in line]


def _logged_cause(folder: Path) -> str | None:
    """Why W&B's service could not write, from the errors it logged: one of :data:`~.errors.DISK`'s reasons,
    else None."""
    for line in _logged_errors(folder):
        for code, reason in DISK.items():
            if os.strerror(code).lower() in line:
                return reason
    return None


def _writer_failed(folder: Path) -> bool:
    """True when W&B's service logged that a record did not go into the run file (its writer writes none after)."""
    return any("writer: failed to save record" in line for line in _logged_errors(folder))


def _exit_within(path: Path, seconds: float) -> bool:
    """True when the run file ``path`` reads back whole up to its exit record within ``seconds``."""
    deadline = time.monotonic() + seconds
    while not _has_exit(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _let_go_of_service() -> None:
    """Drop this process's connection to a W&B service that is gone, and W&B's exit hook with it (it would print
    a traceback), so that the next run starts a new service."""
    try:
        wandb.teardown()
    except _SERVICE_LOST:
        pass


def wandb_enabled(cfg: dict) -> bool:
    """True when the resolved config logs to W&B (``logger.wandb`` and a mode other than disabled)."""
    log = cfg["logger"]
    return bool(log["wandb"]) and log["mode"] != "disabled"


def run_tags(cfg: dict) -> list[str]:
    """The run's tags: task, model, data, gate shape and kind (not for training), then ``logger.tags``."""
    gate, data = cfg.get("gate") or {}, cfg.get("data") or {}
    task = cfg.get("task", "figures")
    tags = [f"task:{task}", f"model:{cfg['model']['name']}", f"data:{data.get('kind', '-')}"]
    if task != "train":  # training runs use no gates
        tags += [f"gate:{gate.get('shape', '-')}", f"gate_kind:{gate.get('kind', '-')}"]
    return tags + [str(t) for t in cfg["logger"].get("tags") or []]


def _notes(cfg: dict) -> str:
    """``logger.notes``, else one sentence saying what the run computes."""
    if cfg["logger"].get("notes"):
        return str(cfg["logger"]["notes"])
    gate, task = cfg.get("gate") or {}, cfg.get("task", "figures")
    what = f"{task} of {cfg['model']['name']} on {(cfg.get('data') or {}).get('kind', '?')}"
    if task == "train":
        return what
    temps = ", ".join(f"{float(t):g}" for t in cfg.get("temperatures") or [])
    return f"{what}; {gate.get('shape', '?')} gates at T = {temps} (main T = {gate.get('temperature', '?')})"


def _cell(v: Any) -> Any:
    """A table cell W&B can type: None for missing values ("" or NaN)."""
    if v == "" or (isinstance(v, float) and math.isnan(v)):
        return None
    return v


def _table(header: list, rows: list[list]) -> wandb.Table:
    return wandb.Table(columns=[str(h) for h in header], data=[[_cell(v) for v in r] for r in rows])


class Dashboard:
    """One W&B run for one job. Open it with :meth:`open` on the launcher before the work starts."""

    def __init__(self, run, outcome: str = "nothing was published"):
        self.run = run
        self.outcome = outcome  # what became of the results when W&B's part fails: its error line's last words
        self.finished = False
        self.lost: str | None = None  # the error line, once W&B's service is gone

    @classmethod
    def open(cls, cfg: dict, out: Path, name: str) -> Dashboard | None:
        """Start the job's W&B run in ``out/wandb`` (None when the config logs no W&B). cfg: the resolved
        config; name: the run name (in a multirun, the job's overrides)."""
        if not wandb_enabled(cfg):
            return None
        return cls.start(
            cfg["logger"],
            out,
            name=name,
            group=cfg["logger"].get("group") or cfg["name"],
            job_type=str(cfg.get("task", "figures")),
            tags=run_tags(cfg),
            notes=_notes(cfg),
            config=cfg,
        )

    @classmethod
    def start(cls, log: dict, out: Path, outcome: str = "nothing was published", **fields) -> Dashboard:
        """A W&B run in ``out/wandb`` under the ``logger`` settings ``log`` (project, mode); outcome: what became
        of the results when W&B's part fails (the last words of its error lines); fields: name, group, job_type, tags,
        notes, config as ``wandb.init`` takes them."""
        out.mkdir(parents=True, exist_ok=True)

        def init():
            return wandb.init(
                project=log["project"],
                dir=str(out),
                mode=log["mode"],
                reinit="create_new",
                settings=wandb.Settings(silent=True),
                **fields,
            )

        try:
            run = init()
        except _SERVICE_LOST:  # the service an earlier run in this process used is gone: this run starts another
            _let_go_of_service()
            try:
                run = init()
            except _SERVICE_LOST as err:
                _let_go_of_service()
                raise PipelineError(f"cannot start W&B's service ({err or type(err).__name__}); {outcome}") from None
        return cls(run, outcome)

    @property
    def folder(self) -> Path:
        """The run's local folder (``<out>/wandb/offline-run-...`` or ``run-...``): what ``wandb sync`` takes."""
        return Path(self.run.dir).parent

    def fit_logger(self) -> WandbLogger:
        """A Lightning logger writing a training run's steps into this run (also from spawned DDP ranks)."""
        return WandbLogger(experiment=self.run)

    def log_results(
        self,
        figures: dict[str, str],
        folder: Path,
        table: list[list],
        summary: dict,
        by_temperature: list[dict],
        tables: dict[str, list[list]] | None = None,
    ) -> None:
        """Log a finished job's results. figures: {key: caption}, the images read from ``folder/<key>.png``;
        table: header row, then rows (the ``metrics`` table); summary: the run's scalars; by_temperature: one
        record per (method, T); tables: more tables by name (see :class:`~.tasks.base.Outputs`)."""
        run = self.run
        with self._calling("logging the results"):
            for key, caption in figures.items():
                with Image.open(folder / f"{key}.png") as im:
                    run.log({f"figures/{key}": wandb.Image(im.copy(), caption=caption)}, commit=False)
        all_tables = {"metrics": table, **(tables or {})}
        if by_temperature:
            columns = ["method", TEMPERATURE] + sorted(
                {k for r in by_temperature for k in r if k not in ("method", TEMPERATURE)}
            )
            all_tables["by_temperature"] = [columns] + [[r.get(c, "") for c in columns] for r in by_temperature]
        self.log_tables(all_tables)
        with self._calling("logging the results"):
            self._log_against_temperature(by_temperature)
            if by_temperature and TEMPERATURE not in summary:  # the last T logged is not the run's T
                del run.summary[TEMPERATURE]
            run.summary.update({k: v for k, v in summary.items() if _cell(v) is not None})

    def log_tables(self, tables: dict[str, list[list]]) -> None:
        """Log tables {key: header row, then rows} ("" and NaN as missing values) in one history step."""
        with self._calling("logging the tables"):
            for key, rows in tables.items():
                if rows:
                    self.run.log({key: _table(rows[0], rows[1:])}, commit=False)
            self.run.log({}, commit=True)

    def summarize(self, values: dict) -> None:
        """Put ``values`` in the run's summary."""
        with self._calling("updating the summary"):
            self.run.summary.update(values)

    @contextmanager
    def _calling(self, doing: str) -> Iterator[None]:
        """Calls into W&B (``doing``: what for, as in "while ..."). Its writes of media and table files fail with
        an OSError naming no file: the run's folder is named. Once its service is gone every call fails with a
        lost connection: a PipelineError naming the run file (see :meth:`_lose`), raised again by later calls."""
        if self.lost:
            raise PipelineError(self.lost)
        try:
            yield
        except _SERVICE_LOST as err:
            self._lose(err, doing)
            raise PipelineError(self.lost) from None
        except OSError as err:
            if err.filename is None and err.errno is not None:
                raise OSError(err.errno, err.strerror, os.fspath(self.folder)) from err
            raise

    def _lose(self, err: BaseException, doing: str) -> None:
        """W&B's service is gone (``err``, met while ``doing``): note the error line and let go of W&B. The run is
        marked finished (its exit cannot be sent) and the connection torn down - no run here can reach a dead
        service - so that W&B's exit hook prints no traceback and a later run starts a new service. W&B's import
        hooks and Lightning's logger may meet the loss first: the run then fails, and meets it in :meth:`finish`."""
        what = " ".join(str(err).split()) or type(err).__name__
        reason = (
            f"W&B's service process ended during the run ({what}, found while {doing}): what it had not yet "
            f"written there is lost, the run's end among it"
        )
        self.lost = cannot_write(Path(self.run.settings.sync_file), reason, self.outcome, advice="run it again")
        self.finished = True
        try:
            self.run.finish(exit_code=1)
        except _SERVICE_LOST:
            pass
        _let_go_of_service()

    def _log_against_temperature(self, records: list[dict]) -> None:
        """One history row per T: ``<method>/<metric>`` against the ``temperature`` x axis."""
        if not records:
            return
        run = self.run
        run.define_metric(TEMPERATURE, hidden=True)
        for method in sorted({r["method"] for r in records}):
            run.define_metric(f"{method}/*", step_metric=TEMPERATURE, summary="none")
        by_t: dict[float, dict] = {}
        for r in records:
            row = by_t.setdefault(float(r[TEMPERATURE]), {TEMPERATURE: float(r[TEMPERATURE])})
            row.update(
                {
                    f"{r['method']}/{k}": v
                    for k, v in r.items()
                    if k not in ("method", TEMPERATURE) and _cell(v) is not None
                }
            )
        for t in sorted(by_t):
            run.log(by_t[t])

    def log_timing(self, timing: dict, device: str) -> None:
        """The run's time split (``timing/*``) and the device it ran on, in the summary."""
        self.summarize({**{f"timing/{k}": v for k, v in timing.items() if v is not None}, "device": device})

    def finish(self, exit_code: int = 0, stopped_by: str | None = None) -> None:
        """Finish the run: 0 finished, else failed; ``stopped_by`` (a signal name) tags it ``stopped``. A run
        finished already is left as it is. When W&B's service has logged that it could not write the run file,
        the run is finished as failed with the cause as ``dashboard_error`` in its summary: the cut file cannot
        take them (its writer writes nothing after a failed write), but an online run's server gets them.

        Raises PipelineError when W&B's service is gone, unless the run was stopped (the stop is what to say)."""
        if self.finished:
            return
        try:
            with self._calling("finishing the run"):
                self.finished = True
                if stopped_by:
                    self.run.tags = (*self.run.tags, "stopped")
                    self.run.summary["stopped_by"] = stopped_by
                if exit_code == 0 and _writer_failed(self.folder):
                    cause = _logged_cause(self.folder) or "a write failed"
                    self.run.summary["dashboard_error"] = f"W&B's service could not write the run file: {cause}"
                    exit_code = 1
                self.run.finish(exit_code=exit_code)
        except PipelineError:
            if stopped_by is None:
                raise

    def fail(self, cause: BaseException) -> None:
        """Finish the run as failed because of ``cause``. W&B's service found gone here is what to say (a
        PipelineError) only when ``cause`` is the lost connection itself (Lightning's logger, W&B's import hooks
        meet it first); any other cause is what the run failed of, and stands."""
        try:
            self.finish(1)
        except PipelineError:
            if isinstance(cause, _SERVICE_LOST):
                raise

    def check_written(self, wait_s: float = 2.0) -> None:
        """After :meth:`finish`: raise PipelineError naming the run file when W&B's service did not write the
        whole run into it (the message ends with the dashboard's ``outcome``). The exit record is there when
        ``finish`` returns, unless a write failed; a file without it after ``wait_s`` seconds is read again once
        the service has closed its files."""
        path = Path(self.run.settings.sync_file)
        if _exit_within(path, wait_s):
            return
        # wandb 0.31 cannot wait for one run's file: its service answers nothing when a run's stream is closed,
        # and run.finish has already waited on the run's exit record. Only wandb.teardown waits until the service
        # has closed every file, and it ends every other run open in this process: while one is, wait instead.
        if wandb_setup.singleton().most_recent_active_run is None:
            try:
                wandb.teardown()
            except SystemExit:  # the service ended with an error of its own: the file tells what was written
                pass
            written = _has_exit(path)
        else:
            written = _exit_within(path, wait_s)
        if not written:
            cause = _logged_cause(self.folder)
            reason = f"W&B's writer failed: {cause}" if cause else "W&B's writer stopped before the end of the run"
            raise PipelineError(cannot_write(path, reason, self.outcome))

    def write_pointer(self, staging: Path) -> None:
        """``staging/wandb_run.txt``: the run's folder, for the report and for runs skipped later."""
        write_text(staging / "wandb_run.txt", os.fspath(self.folder) + "\n")
