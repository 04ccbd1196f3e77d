"""Experiment tracking: a training run's metrics table sent to TensorBoard and MLflow.

`MetricsTracker` is a Ray Train `UserCallback`, so it runs in the run's Train controller
(not in the workers). After every report that carries a checkpoint it reads ``metrics.csv``,
which rank 0 rewrites beside each checkpoint, and sends the rows up to the reported step that
it has not sent yet: one scalar per column (``loss``, ``lr``, ``img_per_s``, ``val_loss``,
``val_auc_raw``, ...) at the row's step. The trackers therefore hold exactly the table: rows
logged after the last checkpoint of a failed attempt, which the resumed run computes again,
are never sent. Where a failed attempt resumes from an older checkpoint than one already
reported (the newest could not be loaded), the steps it computes again are sent again, and
TensorBoard hides the earlier figures of those steps.

- TensorBoard: event files in ``RUN/tensorboard/`` (``tensorboard --logdir RUN/tensorboard``),
  one per report. On a local run folder they are written there directly; on object storage
  they are written to a temporary folder on the controller's node and uploaded at once. A
  driver that re-runs the command resends the whole table, starting with a purge marker, so
  TensorBoard shows each step once. Written with `torch.utils.tensorboard` when the
  ``tensorboard`` package is installed, with tensorboardX (which ``ray[tune]`` installs)
  otherwise.
- MLflow: one MLflow run per training run, named after it, with the config as parameters;
  the tracking URI and experiment come from the standard ``MLFLOW_TRACKING_URI`` and
  ``MLFLOW_EXPERIMENT_NAME`` / ``MLFLOW_EXPERIMENT_ID`` variables, read where the trainer is
  built (the driver). Its id is kept in ``RUN/mlflow_run_id`` so that a resumed run logs
  into the same MLflow run. Credentials variables (``MLFLOW_TRACKING_TOKEN``, ...) must reach
  the Ray workers' environment.

A tracker that fails (a tracking server down) logs a warning and retries its unsent rows at
the next report: tracking never stops training.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import tempfile
import time
from typing import Any

from ray.train import UserCallback

from jobs import storage
from jobs.train import TRACKERS, read_metrics

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
MLFLOW_RUN_FILE = "mlflow_run_id"
DEFAULT_MLFLOW_EXPERIMENT = "colorcore"
MLFLOW_BATCH = 999  # metrics per log_batch call: with the step tag, MLflow's 1,000 entries
Row = dict[str, float]


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def trackers(tracking: str) -> tuple[str, ...]:
    """The trackers `tracking` (a validated `TrainConfig.tracking`) asks for, on this machine.

    ``auto``: TensorBoard when a writer is installed, MLflow when mlflow is installed and
    ``MLFLOW_TRACKING_URI`` is set. A tracker named explicitly must be installed.
    """
    tensorboard = _installed("tensorboard") or _installed("tensorboardX")
    if tracking == "none":
        return ()
    if tracking == "auto":
        mlflow = _installed("mlflow") and bool(os.environ.get("MLFLOW_TRACKING_URI"))
        if mlflow and (problem := _mlflow_problem()):
            log.warning("tracking: leaving MLflow out: %s", problem)
            mlflow = False
        return tuple(t for t, on in zip(TRACKERS, (tensorboard, mlflow), strict=True) if on)
    names = tuple(tracking.split(","))
    if "tensorboard" in names and not tensorboard:
        raise ValueError("tracking=tensorboard needs tensorboardX or tensorboard: pip install it")
    if "mlflow" in names and not _installed("mlflow"):
        raise ValueError("tracking=mlflow but mlflow is not installed: pip install mlflow")
    if "mlflow" in names and (problem := _mlflow_problem()):
        raise ValueError(f"tracking=mlflow: {problem}")
    return names


def _mlflow_problem() -> str | None:
    """Why the installed MLflow cannot use its tracking URI, or None. Its client checks the
    URI's scheme when it is made, without contacting a server: mlflow-skinny, for one, takes
    no database URI (``sqlite:``, MLflow's default), which needs the full package."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    try:
        mlflow.MlflowClient(uri)
    except Exception as error:
        reason = _without_password(str(error).strip().split(". ")[0], uri)
        return (
            f"MLflow cannot use the tracking URI {_without_password(uri)} ({reason}); set "
            "MLFLOW_TRACKING_URI to a server (http://...), or pip install mlflow for a database"
        )
    return None


def tracking_callbacks(
    tracking: str,
    *,
    run_url: str,
    run_name: str,
    final_step: int,
    config: dict[str, Any],
    s3: storage.S3Options,
) -> list[UserCallback]:
    """The callbacks that send a run's metrics table to the trackers `tracking` asks for."""
    sinks: list[TensorBoardSink | MLflowSink] = []
    for name in trackers(tracking):
        if name == "tensorboard":
            sinks.append(TensorBoardSink(storage.join(run_url, TENSORBOARD_DIR), s3))
        else:
            sinks.append(MLflowSink.from_environment(run_url, run_name, final_step, config, s3))
    if not sinks:
        return []
    return [MetricsTracker(sinks, run_url=run_url, s3=s3)]


class MetricsTracker(UserCallback):
    """Sends the rows of the run's metrics table to each sink, each row once per sink."""

    def __init__(self, sinks: list, *, run_url: str, s3: storage.S3Options) -> None:
        self.sinks = sinks
        self.run_url = run_url
        self.s3 = s3
        self.held: list[dict[float, Row]] = [{} for _ in sinks]  # per sink: its rows by step

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        # Rank 0 rewrites the table before each checkpoint's report; a report without one is
        # a run resumed at its end repeating its final figures, its table complete. Rows up
        # to the reported step only: by the time the controller handles a report, rank 0 may
        # already have rewritten the table for its next checkpoint.
        # Nothing here may stop training: what fails is sent again at the next report.
        try:
            self._send(metrics)
        finally:
            if "diverged" in metrics[0]:  # the run's last report: it stops here
                for sink in self.sinks:
                    try:
                        sink.fail()
                    except Exception as error:
                        log.warning("tracking: %s failed: %s", sink, sink.scrub(str(error)))

    def _send(self, metrics: list[dict[str, Any]]) -> None:
        try:
            reported = metrics[0]["step"]
            rows = [r for r in read_metrics(self.run_url, self.s3) if r["step"] <= reported]
        except Exception as error:
            log.warning("tracking: reading the metrics table failed, retrying later: %s", error)
            return
        for sink, held in zip(self.sinks, self.held, strict=True):
            # A row the sink holds with other figures: the run went back to an older
            # checkpoint than one already reported (the newest could not be loaded) and
            # computed that step again. Everything from there on is sent again.
            redo = next((r["step"] for r in rows if not _same(held.get(r["step"], r), r)), None)
            last = max(held, default=-1.0)
            new = [r for r in rows if r["step"] > last or (redo is not None and r["step"] >= redo)]
            if not new:
                continue
            try:
                sink.write(new, purge=not held or redo is not None)
            except Exception as error:
                message = sink.scrub(str(error))
                log.warning("tracking: %s failed, retrying at the next report: %s", sink, message)
                continue
            for step in [s for s in held if s >= new[0]["step"]]:
                del held[step]
            held.update((r["step"], r) for r in new)


def _same(a: Row, b: Row) -> bool:
    """Whether two rows hold the same figures (a diverged run's NaN equal to itself)."""
    return a.keys() == b.keys() and all(
        a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a
    )


def _scalars(row: Row) -> dict[str, float]:
    return {k: v for k, v in row.items() if k != "step"}


class TensorBoardSink:
    """Event files in `logdir` (a run folder's ``tensorboard/``, local or on storage).

    Each write is a new event file, closed at once: closing is the one call that both
    TensorBoard writers guarantee puts every event on disk (tensorboardX's flush does not
    wait for its queue).
    """

    def __init__(self, logdir: str, s3: storage.S3Options) -> None:
        self.logdir = logdir
        self.s3 = s3

    def __repr__(self) -> str:
        return f"TensorBoard({self.logdir})"

    def scrub(self, text: str) -> str:
        return text

    def fail(self) -> None:
        """The run diverged: event files have no status to say so."""

    def write(self, rows: list[Row], *, purge: bool = False) -> None:
        """One event file of `rows`; with `purge`, it starts with a marker that hides what
        earlier files hold from its first step on."""
        if _installed("tensorboard"):
            from torch.utils.tensorboard import SummaryWriter
        else:
            from tensorboardX import SummaryWriter

        local = storage.is_local(self.logdir)
        with tempfile.TemporaryDirectory(prefix="colorcore-tensorboard-") as scratch:
            folder = storage.filesystem(self.logdir)[1] if local else scratch
            # The suffix keeps names unique and in order (tensorboardX's own names only count
            # seconds), which is the order TensorBoard reads them and applies their purges.
            purge_step = int(rows[0]["step"]) if purge else None
            suffix = f".{time.time_ns()}.{os.getpid()}"
            writer = SummaryWriter(folder, purge_step=purge_step, filename_suffix=suffix)
            for row in rows:
                for tag, value in _scalars(row).items():
                    writer.add_scalar(tag, value, global_step=int(row["step"]))
            writer.close()
            if not local:
                for name in os.listdir(scratch):
                    with open(os.path.join(scratch, name), "rb") as f:
                        storage.write_bytes(storage.join(self.logdir, name), f.read(), self.s3)


class MLflowSink:
    """One MLflow run per training run; its id is kept in the run folder. The MLflow run is
    marked finished once the row of `final_step` is sent."""

    def __init__(
        self,
        *,
        tracking_uri: str,
        experiment: str | None,
        experiment_id: str | None,
        run_name: str,
        run_url: str,
        final_step: int,
        params: dict[str, str],
        s3: storage.S3Options,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.experiment_id = experiment_id
        self.run_name = run_name
        self.run_url = run_url
        self.final_step = final_step
        self.params = params
        self.s3 = s3
        self._run_id: str | None = None
        self._done_step = -1.0  # the last step the MLflow run holds
        self._params_logged = True

    @classmethod
    def from_environment(
        cls,
        run_url: str,
        run_name: str,
        final_step: int,
        config: dict[str, Any],
        s3: storage.S3Options,
    ) -> MLflowSink:
        """Tracking URI and experiment resolved here (the driver), as MLflow resolves them."""
        import mlflow

        return cls(
            tracking_uri=mlflow.get_tracking_uri(),
            experiment=os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_MLFLOW_EXPERIMENT),
            experiment_id=os.environ.get("MLFLOW_EXPERIMENT_ID"),
            run_name=run_name,
            run_url=run_url,
            final_step=final_step,
            params=_flatten(config),
            s3=s3,
        )

    def __repr__(self) -> str:
        return f"MLflow({_without_password(self.tracking_uri)}, run {self.run_name})"

    def scrub(self, text: str) -> str:
        """`text` (an MLflow error, which may quote the tracking URI) without its password."""
        return _without_password(text, self.tracking_uri)

    def write(self, rows: list[Row], *, purge: bool = False) -> None:
        """Logs the rows past the last step the run holds, a batch of whole rows at a time,
        each batch with the step it reaches as the run's `colorcore.step` tag (in the same
        request): a driver that restarts resends only what no batch holds. MLflow cannot take
        back what it holds: `purge` is not for it."""
        from mlflow import MlflowClient
        from mlflow.entities import Metric, RunTag

        client = MlflowClient(self.tracking_uri)
        run_id = self._run(client)
        now_ms = int(time.time() * 1000)
        batch: list[Metric] = []
        pending = [row for row in rows if row["step"] > self._done_step]
        for k, row in enumerate(pending):
            batch += [
                Metric(key, value, now_ms, int(row["step"])) for key, value in _scalars(row).items()
            ]
            last = k + 1 == len(pending)
            if last or len(batch) + len(_scalars(pending[k + 1])) > MLFLOW_BATCH:
                step = RunTag("colorcore.step", str(int(row["step"])))
                client.log_batch(run_id, metrics=batch, tags=[step])
                self._done_step, batch = row["step"], []
        if rows[-1]["step"] >= self.final_step:
            client.set_terminated(run_id, "FINISHED")

    def fail(self) -> None:
        """The run diverged: its MLflow run ends FAILED, not RUNNING for ever."""
        from mlflow import MlflowClient

        client = MlflowClient(self.tracking_uri)
        client.set_terminated(self._run(client), "FAILED")

    def _run(self, client) -> str:
        """The id of the run recorded in the run folder, or of a new one (recorded at once,
        so that a retry after a failed first write does not make another)."""
        if self._run_id is None:
            record = storage.join(self.run_url, MLFLOW_RUN_FILE)
            run = None
            if storage.exists(record, self.s3):
                run_id = storage.read_bytes(record, self.s3).decode().strip()
                run = self._recorded_run(client, run_id)
            if run is not None:
                self._done_step = float(run.data.tags.get("colorcore.step", -1))
                self._params_logged = bool(run.data.params)  # a driver may die before them
                if run.info.status in ("FINISHED", "FAILED") and self._done_step < self.final_step:
                    client.update_run(run_id, status="RUNNING")  # resumed: past its old end,
                    # or after it diverged, with other settings
                self._run_id = run_id
            else:
                run_id = self._create(client)
                storage.write_bytes(record, run_id.encode(), self.s3)
                self._run_id, self._done_step, self._params_logged = run_id, -1.0, False
        if not self._params_logged:
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in self.params.items()]
            for start in range(0, len(params), 100):  # MLflow's limit on params per call
                client.log_batch(self._run_id, params=params[start : start + 100])
            self._params_logged = True
        return self._run_id

    def _recorded_run(self, client, run_id: str):
        """The MLflow run the run folder records, or None where the server has none of that
        id or it was deleted (another server, or a run someone removed): the rows then go
        to a new run, which the folder records instead. Read before anything is kept: a
        retry after a failure reads it again."""
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(run_id)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            run = None
        if run is None or run.info.lifecycle_stage == "deleted":
            log.warning(
                "MLflow run %s recorded in %s is not on %s (deleted, or another server): "
                "the metrics go to a new run", run_id, self.run_url,
                _without_password(self.tracking_uri),
            )  # fmt: skip
            return None
        return run

    def _create(self, client) -> str:
        experiment_id = self.experiment_id
        if experiment_id is None:
            found = client.get_experiment_by_name(self.experiment)
            experiment_id = (
                found.experiment_id if found else client.create_experiment(self.experiment)
            )
        run = client.create_run(
            experiment_id, run_name=self.run_name, tags={"colorcore.run_url": self.run_url}
        )
        return run.info.run_id


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow parameters: ``model.width`` -> ``"0.125"``."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def _without_password(text: str, uri: str | None = None) -> str:
    """`text` fit for a log line: where `uri` (default: `text` itself, a tracking URI) has
    user info, its password, or a token given as the user, is masked wherever it appears,
    and so is its query (``?password=...``, ``?token=...``). The user info runs to the URI's
    last ``@``: a raw ``@``, ``/`` or ``#`` in a password is masked with it (and an ``@`` in
    a path masks more than it needs, never less)."""
    uri = uri or text
    if (found := re.match(r"[A-Za-z][\w+.-]*://(.*)@", uri)) and found[1]:
        user, colon, _ = found[1].partition(":")
        text = text.replace(found[1], f"{user}:***" if colon else "***")
    if query := re.match(r"[A-Za-z][\w+.-]*://[^?#]*\?([^#]+)", uri):
        text = text.replace("?" + query[1], "?***")
    return text
