"""The MLflow sink against MLflow's own client and a file store: each step once across
driver restarts and failures, one MLflow run per training run, no password in the logs."""

from __future__ import annotations

import logging

import pytest

from jobs import tracking
from jobs.tracking import MetricsTracker, MLflowSink
from jobs.train_loop import _csv

mlflow = pytest.importorskip("mlflow")

DOWN = "http://colorcore:s3cret-pw@127.0.0.1:9"  # nothing listens there


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a server-less store for tests
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a server down fails at once
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    return f"file://{tmp_path}/mlruns"


def sink(uri: str, run_url: str, final_step: int = 40) -> MLflowSink:
    return MLflowSink(
        tracking_uri=uri,
        experiment="colorcore-tests",
        experiment_id=None,
        run_name="run",
        run_url=run_url,
        final_step=final_step,
        params={"lr": "0.001", "model.width": "0.0625"},
        s3=None,
    )


def rows(*steps: int) -> list[dict[str, float]]:
    return [{"step": float(s), "loss": 100.0 - s} for s in steps]


def history(uri: str) -> tuple[list[int], str, dict[str, str]]:
    client = mlflow.MlflowClient(uri)
    [experiment] = [e for e in client.search_experiments() if e.name == "colorcore-tests"]
    [run] = client.search_runs([experiment.experiment_id])
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    return sorted(steps), run.info.status, run.data.params


def test_a_restarted_driver_resends_nothing_the_run_holds(store, tmp_path) -> None:
    run_url = str(tmp_path / "run")
    first = sink(store, run_url)
    first.write(rows(10, 20))
    restarted = sink(store, run_url)  # a new driver: it knows only the run folder
    restarted.write(rows(10, 20, 30, 40))
    steps, status, params = history(store)
    assert steps == [10, 20, 30, 40] and status == "FINISHED"
    assert params == {"lr": "0.001", "model.width": "0.0625"}
    # Resumed past its end with more steps: running again, and finished at the new end.
    longer = sink(store, run_url, final_step=60)
    longer.write(rows(10, 20, 30, 40, 50))
    assert history(store)[1] == "RUNNING"
    longer.write(rows(60))
    assert history(store)[:2] == ([10, 20, 30, 40, 50, 60], "FINISHED")


def test_a_server_down_at_restart_costs_no_duplicate_and_no_second_run(store, tmp_path) -> None:
    run_url = str(tmp_path / "run")
    sink(store, run_url).write(rows(10, 20))
    restarted = sink(DOWN, run_url)
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"127\.0\.0\.1:9"):  # refused
        restarted.write(rows(10, 20, 30))
    restarted.tracking_uri = store  # the server is back
    restarted.write(rows(10, 20, 30))
    assert history(store)[0] == [10, 20, 30]

    fresh = sink(DOWN, str(tmp_path / "other"))
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"127\.0\.0\.1:9"):
        fresh.write(rows(10))
    assert not (tmp_path / "other" / "mlflow_run_id").exists()  # no run made, none recorded


def test_a_failing_tracker_warns_without_its_password_and_never_raises(
    store, tmp_path, caplog
) -> None:
    run_url = tmp_path / "run"
    run_url.mkdir()
    (run_url / "metrics.csv").write_bytes(_csv(rows(10, 20)))
    tracker = MetricsTracker([sink(DOWN, str(run_url))], run_url=str(run_url), s3=None)
    with caplog.at_level(logging.WARNING, logger="jobs.tracking"):
        tracker.after_report(None, [{"step": 20}], None)
    assert "retrying at the next report" in caplog.text
    assert "s3cret-pw" not in caplog.text and "colorcore:***@" in caplog.text
    tracker.sinks[0].tracking_uri = store  # back: the rows it missed are sent now
    tracker.after_report(None, [{"step": 20}], None)
    assert history(store)[0] == [10, 20]
    (run_url / "metrics.csv").write_bytes(b"not,a\ntable")  # a table that does not read
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jobs.tracking"):
        tracker.after_report(None, [{"step": 30}], None)
    assert "reading the metrics table failed" in caplog.text


def test_a_diverged_run_ends_failed(store, tmp_path) -> None:
    """Its last report says it diverged: the MLflow run ends FAILED, not RUNNING for ever."""
    run_url = tmp_path / "run"
    run_url.mkdir()
    (run_url / "metrics.csv").write_bytes(_csv(rows(10, 20)))
    tracker = MetricsTracker([sink(store, str(run_url))], run_url=str(run_url), s3=None)
    tracker.after_report(None, [{"step": 20}], None)
    assert history(store)[:2] == ([10, 20], "RUNNING")
    (run_url / "metrics.csv").write_bytes(b"not,a\ntable")  # and the table does not read
    tracker.after_report(None, [{"step": 25, "diverged": 25}], None)
    assert history(store)[:2] == ([10, 20], "FAILED")
    # Resumed with other settings (a lower --lr): running again
    sink(store, str(run_url)).write(rows(10, 20, 30))
    assert history(store)[:2] == ([10, 20, 30], "RUNNING")


@pytest.mark.parametrize(
    "uri, shown",
    [
        ("https://colorcore:s3cret@mlflow.example.com", "https://colorcore:***@mlflow.example.com"),
        ("https://mlflow.example.com/?token=s3cret", "https://mlflow.example.com/?***"),
        ("http://mlflow:5000/?a", "http://mlflow:5000/?***"),  # "a" kept elsewhere
        ("postgresql://me@db/mlflow?password=s3cret#x", "postgresql://***@db/mlflow?***#x"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ],
)
def test_a_tracking_uris_password_and_query_are_masked_wherever_they_appear(uri, shown):
    text = f"could not reach {uri}: a refused connection ({uri})"
    expected = f"could not reach {shown}: a refused connection ({shown})"
    assert tracking._without_password(text, uri) == expected
    assert tracking._without_password(uri) == shown


def test_a_run_recorded_without_its_params_gets_them(store, tmp_path) -> None:
    """A driver that died between making the MLflow run and logging its params."""
    client = mlflow.MlflowClient(store)
    run = client.create_run(client.create_experiment("colorcore-tests"), run_name="run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "mlflow_run_id").write_text(run.info.run_id)
    sink(store, str(tmp_path / "run")).write(rows(10))
    assert history(store)[2] == {"lr": "0.001", "model.width": "0.0625"}


def test_a_full_batch_and_its_step_go_in_one_request(store, tmp_path) -> None:
    """999 metrics and the step tag make MLflow's 1,000 entries: a batch of whole rows
    never spills a metric into a second request that a dying driver would not send."""
    wide = [{"step": float(s), **{f"m{i}": 1.0 for i in range(250)}} for s in (1, 2, 3, 4)]
    target = sink(store, str(tmp_path / "run"))
    calls = []
    client_class = mlflow.MlflowClient

    class Counting(client_class):
        def log_batch(self, run_id, metrics=(), params=(), tags=(), **kw):
            calls.append(len(metrics) + len(params) + len(tags))
            return super().log_batch(run_id, metrics=metrics, params=params, tags=tags, **kw)

    mlflow.MlflowClient = Counting
    try:
        target.write(wide)
    finally:
        mlflow.MlflowClient = client_class
    assert calls == [2, 751, 251]  # the params, then rows 1 to 3 and row 4, each with its tag


def test_a_tracking_uri_mlflow_cannot_use_fails_before_training(monkeypatch, caplog) -> None:
    """Named, the tracker stops the job before Ray starts; under auto it is left out with a
    warning. Neither message shows the URI's password."""
    from jobs.tracking import trackers

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchstore://colorcore:s3cret-pw@host/x")
    with pytest.raises(ValueError, match="cannot use the tracking URI nosuchstore://") as error:
        trackers("mlflow")
    assert "s3cret-pw" not in str(error.value)
    with caplog.at_level(logging.WARNING, logger="jobs.tracking"):
        assert "mlflow" not in trackers("auto")
    assert "leaving MLflow out" in caplog.text and "s3cret-pw" not in caplog.text


def test_a_recorded_run_the_server_does_not_have_is_replaced(store, tmp_path, caplog) -> None:
    """The run folder records an MLflow run that was deleted, or that another server (the
    one the run now logs to) never had: the rows go to a new run, recorded instead, where
    every write failed before."""
    run_url = str(tmp_path / "run")
    sink(store, run_url).write(rows(10, 20))
    client = mlflow.MlflowClient(store)
    recorded = (tmp_path / "run" / "mlflow_run_id").read_text()
    client.delete_run(recorded)
    with caplog.at_level(logging.WARNING, logger="jobs.tracking"):
        sink(store, run_url).write(rows(10, 20, 30))
    assert "is not on" in caplog.text
    replaced = (tmp_path / "run" / "mlflow_run_id").read_text()
    assert replaced != recorded
    steps = [m.step for m in client.get_metric_history(replaced, "loss")]
    assert steps == [10, 20, 30]  # the whole table, to the run that had none of it

    other = f"file://{tmp_path}/other-mlruns"  # another server: it never had either run
    sink(other, run_url).write(rows(10, 20, 30, 40))
    assert history(other)[:2] == ([10, 20, 30, 40], "FINISHED")
