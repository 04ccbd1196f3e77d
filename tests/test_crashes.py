"""The crash guard's records, on a local folder and on the moto S3 endpoint: a process's
death is played by an exception that the guard does not catch, after which the same batch
is handed to it again, as Ray's retry hands it to a new process. (The colorize tests run it
in Ray's workers, with an input that kills them.)"""

from __future__ import annotations

import numpy as np
import pytest

from jobs import storage
from jobs.crashes import CrashGuard


class Died(BaseException):
    """What the process's death leaves: nothing after it runs."""


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "crashes")
    return request.getfixturevalue("s3_server").url(f"crashes-{request.node.originalname}")


def batch(*sources: str, status: str = "pending") -> dict[str, np.ndarray]:
    column = lambda values: np.array(values, dtype=object)  # noqa: E731
    n = len(sources)
    return {"source": column(sources), "status": column([status] * n), "reason": column([""] * n)}


class Stage:
    """Work that records the rows it got and dies on those in `kills`."""

    def __init__(self, kills: set[str] = frozenset()) -> None:
        self.kills, self.calls = kills, []

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append([(s, st) for s, st in zip(rows["source"], rows["status"], strict=True)])
        for source, status in zip(rows["source"], rows["status"], strict=True):
            if status == "pending" and source in self.kills:
                raise Died(source)
        return {**rows, "done": np.array([s + "!" for s in rows["source"]], dtype=object)}


def test_a_batch_that_finishes_leaves_no_record_and_is_worked_on_whole(folder) -> None:
    guard, stage = CrashGuard(folder), Stage()
    out = guard("model", batch("a", "b", "c"), stage)
    assert stage.calls == [[("a", "pending"), ("b", "pending"), ("c", "pending")]]
    assert list(out["done"]) == ["a!", "b!", "c!"]
    assert not storage.exists(folder) or storage.list_files(folder) == []


def test_a_row_that_kills_its_process_is_given_up_after_tries_deaths_alone(folder) -> None:
    guard, stage = CrashGuard(folder, tries=2, doing="colorized"), Stage(kills={"b"})
    rows = batch("a", "b", "c")
    for _ in range(3):  # the whole batch; then b alone, twice
        with pytest.raises(Died):
            guard("model", rows, stage)
    assert stage.calls[1:] == [[("a", "pending")], [("b", "pending")]] * 2
    out = guard("model", rows, stage)  # the fourth try gives b up
    assert stage.calls[-3:] == [[("a", "pending")], [("b", "error")], [("c", "pending")]]
    assert list(out["status"]) == ["pending", "error", "pending"]
    assert out["reason"][1].startswith("the process that colorized it died each of the 2 times")
    assert list(out["done"]) == ["a!", "b!", "c!"]  # rows in their order, each once
    assert storage.list_files(folder) == []  # the batch done: its records go
    # Another stage, or the same stage with other rows, starts afresh.
    assert list(guard("write", rows, Stage())["status"]) == ["pending"] * 3


def test_a_death_is_charged_to_the_row_alone_at_the_time_only(folder) -> None:
    """Rows worked on alone before a later row's death are not charged for it, and a row
    given up stays given up while its batch is tried again."""
    guard = CrashGuard(folder, tries=1)
    rows = batch("a", "b", "c")
    with pytest.raises(Died):
        guard("model", rows, Stage(kills={"a"}))  # the whole batch
    with pytest.raises(Died):
        guard("model", rows, Stage(kills={"a"}))  # a alone: its one death
    stage = Stage(kills={"c"})
    with pytest.raises(Died):
        guard("model", rows, stage)  # a given up; b done; c alone dies
    assert stage.calls == [[("a", "error")], [("b", "pending")], [("c", "pending")]]
    stage = Stage()
    out = guard("model", rows, stage)  # a still given up; b not charged; c given up
    assert stage.calls == [[("a", "error")], [("b", "pending")], [("c", "error")]]
    assert list(out["status"]) == ["error", "pending", "error"]


def test_rows_no_longer_pending_pass_through_and_clear_forgets_a_killed_run(folder) -> None:
    guard = CrashGuard(folder)
    rows = {**batch("p", "q"), "status": np.array(["error", "pending"], dtype=object)}
    with pytest.raises(Died):
        guard("prepare", rows, Stage(kills={"q"}))  # a run killed here
    stage = Stage(kills={"p", "q"})  # careful now: p is passed through, q dies alone
    with pytest.raises(Died):
        guard("prepare", rows, stage)
    assert stage.calls == [[("p", "error")], [("q", "pending")]]
    guard.clear()
    assert storage.list_files(folder) == []
    stage = Stage()
    guard("prepare", rows, stage)  # worked on whole again
    assert stage.calls == [[("p", "error"), ("q", "pending")]]
    CrashGuard(folder + "-never-written").clear()  # nothing to forget: no error


def test_work_that_raises_charges_no_one_and_leaves_no_record(folder) -> None:
    """An error is the stage's to report, not a death: whole or careful, the attempt's
    records go, and no input is charged."""

    class Broken(Stage):
        def __call__(self, rows):
            if "b" in rows["source"]:
                raise OSError("storage refused the write")
            return super().__call__(rows)

    guard, rows = CrashGuard(folder, tries=1), batch("a", "b")
    with pytest.raises(OSError):
        guard("write", rows, Broken())  # whole
    assert storage.list_files(folder) == []
    with pytest.raises(Died):
        guard("write", rows, Stage(kills={"a"}))  # whole, then a death
    with pytest.raises(OSError):
        guard("write", rows, Broken())  # careful: a done, b raises
    assert storage.list_files(folder) == []
    stage = Stage()
    guard("write", rows, stage)  # whole again: nothing was charged
    assert stage.calls == [[("a", "pending"), ("b", "pending")]]


def test_rows_named_by_another_column_and_without_status_or_reason(folder) -> None:
    """evaluate's rows: named by `key`, to do while their reason is empty or absent; a row
    given up gains the reason, and every row the column, so the outputs join."""
    guard = CrashGuard(folder, tries=1, key="key")
    rows = {"key": np.array(["p", "q"], dtype=object), "label": np.array([3, 4])}

    def work(part):  # passes the columns through, as a stage may
        if "q" in part["key"] and not ("reason" in part and part["reason"][0]):
            raise Died("q")
        return dict(part)

    for _ in range(2):  # whole, then q alone
        with pytest.raises(Died):
            guard("measure", rows, work)
    out = guard("measure", rows, work)
    assert list(out["key"]) == ["p", "q"] and list(out["label"]) == [3, 4]
    assert list(out["reason"][:1]) == [""] and "died each of the 1 times" in out["reason"][1]


def test_a_batch_with_nothing_to_do_is_not_recorded(folder) -> None:
    """Rows already failed cannot kill the stage: no records (a split archive's error rows
    share their archive's name, so batches of them would share a record)."""
    guard = CrashGuard(folder)
    stage = Stage(kills={"x"})
    assert list(guard("write", batch("x", "x", status="error"), stage)["status"]) == ["error"] * 2
    assert not storage.exists(folder) or storage.list_files(folder) == []


def test_a_reason_is_whole_in_a_column_of_fixed_width_strings(folder) -> None:
    guard = CrashGuard(folder, tries=1)
    # numpy's own strings, of the width of their longest: <U1, <U7
    rows = {"source": np.array(["a", "b"]), "status": np.array(["pending"] * 2)}
    rows["reason"] = np.array(["", ""])
    for _ in range(2):
        with pytest.raises(Died):
            guard("model", rows, Stage(kills={"b"}))
    out = guard("model", rows, lambda part: dict(part))
    assert out["reason"][1].startswith("the process that worked on it died each of the 1")
