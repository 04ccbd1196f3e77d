"""One driver at a time for a run or search folder (`jobs.lease`), on a local folder and on
the moto S3 server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jobs import lease, storage
from jobs.lease import LEASE_FILE, DriverLease, LeaseHeld

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3_server").url(f"lease-{request.node.name}")


def holder(url: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(storage.join(url, LEASE_FILE)))
    except FileNotFoundError:
        return None


def plant(url: str, **fields) -> None:
    """A lease as another driver would have written it."""
    storage.write_bytes(storage.join(url, LEASE_FILE), json.dumps(fields).encode())


def test_a_second_driver_is_refused_and_the_first_gives_the_folder_back(folder) -> None:
    with DriverLease(folder, what="run r"):
        held = holder(folder)
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        me = f"process {os.getpid()} on {socket.gethostname()}"
        with pytest.raises(LeaseHeld, match=f"run r is in use by another driver, {me}: stop it"):
            DriverLease(folder, what="run r").__enter__()
        assert holder(folder) == held  # the refused one took nothing
    assert holder(folder) is None
    with DriverLease(folder, what="run r"):  # free again
        assert holder(folder)["pid"] == os.getpid()


def test_the_holder_renews_its_lease_while_it_runs(folder, monkeypatch) -> None:
    monkeypatch.setattr(lease, "RENEW_S", 0.05)
    with DriverLease(folder, what="run r"):
        deadline = time.monotonic() + 30
        while holder(folder)["renewals"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert holder(folder)["renewals"] >= 2


def test_a_lease_whose_holder_ended_on_this_machine_is_taken_over_at_once(folder, monkeypatch):
    """Its process is gone (or its id now names a later process): nothing to wait for."""

    def watched(self, holder):
        raise AssertionError("a lease of this machine was watched")

    monkeypatch.setattr(DriverLease, "_lapses", watched)
    ended = subprocess.Popen(["true"])
    ended.wait()
    zombie = subprocess.Popen(["true"])  # ended, not yet waited for
    while lease._process_stat(zombie.pid)[0] != "Z":
        time.sleep(0.01)
    cases = [(ended.pid, None), (zombie.pid, None), (os.getpid(), "0")]  # "0": another's start
    for pid, start in cases:
        plant(folder, machine=storage.MACHINE, host="h", pid=pid, start=start, renewals=3)
        with DriverLease(folder, what="run r"):
            assert holder(folder)["pid"] == os.getpid()
    zombie.wait()


def test_another_machines_lease_is_taken_over_once_it_goes_unrenewed(folder, monkeypatch):
    monkeypatch.setattr(lease, "EXPIRE_S", 0.5)
    monkeypatch.setattr(lease, "WATCH_S", 0.05)
    other = {"machine": "0badf00d", "host": "node-7", "pid": 1, "ray_job": "raysubmit_x"}
    plant(folder, **other, renewals=5)
    with DriverLease(folder, what="run r"):  # it ended: its lease stays as it was
        assert holder(folder)["pid"] == os.getpid()

    plant(folder, **other, renewals=5)
    renewing = threading.Event()

    def renew() -> None:  # a driver that still runs
        n = 5
        while not renewing.wait(0.05):
            n += 1
            plant(folder, **other, renewals=n)

    thread = threading.Thread(target=renew, daemon=True)
    thread.start()
    try:
        with pytest.raises(LeaseHeld, match=r"process 1 on node-7, Ray job raysubmit_x: stop "
                           r"it \(`ray job stop raysubmit_x`\)"):  # fmt: skip
            DriverLease(folder, what="run r").__enter__()
    finally:
        renewing.set()
        thread.join()


def test_a_driver_killed_while_it_holds_the_lease_leaves_it_to_the_next_at_once(tmp_path):
    """The same command run again after a kill -9: the lease names a process gone."""
    folder = str(tmp_path / "run")
    code = (
        "import sys, time\n"
        "from jobs.lease import DriverLease\n"
        "with DriverLease(sys.argv[1], what='run r'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, folder], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match=f"process {child.pid} on"):
            DriverLease(folder, what="run r").__enter__()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert holder(folder)["pid"] == child.pid  # left behind
    with DriverLease(folder, what="run r"):
        assert holder(folder)["pid"] == os.getpid()


def test_every_job_with_an_output_folder_holds_it(tmp_path) -> None:
    """colorize, prepare and evaluate, run again on an output another driver of theirs still
    writes, are refused before they write to it (and before Ray starts)."""
    import numpy as np

    from colorcore.model import ColorizationNet, ModelConfig
    from colorcore.prior import AbHistogram
    from colorcore.weights import save_checkpoint
    from jobs import colorize, evaluate, prepare
    from tests.support import encode, photo_rgb, write_dataset, write_image_tree

    model = str(tmp_path / "tiny.pt")
    save_checkpoint(model, ColorizationNet(ModelConfig(width=1 / 16)))
    (tmp_path / "photo.jpg").write_bytes(encode(photo_rgb("coffee", 48)))
    write_image_tree(tmp_path / "tree")
    data = str(tmp_path / "data")
    write_dataset(data)
    with open(tmp_path / "data" / "prior.npz", "wb") as f:
        AbHistogram(np.ones(313, np.int64)).save(f)
    jobs = [  # (the job's main and config, the folder its lease is in, the job's words)
        (colorize.main,
         colorize.ColorizeConfig(input=str(tmp_path / "photo.jpg"), output=str(tmp_path / "out"),
                                 model=model),
         tmp_path / "out" / "_colorize", "colorize output"),
        (prepare.main, prepare.PrepareConfig(src=str(tmp_path / "tree"), dst=str(tmp_path / "ds")),
         tmp_path / "ds", "dataset"),
        (evaluate.main,
         evaluate.EvaluateConfig(data=data, model=model, output=str(tmp_path / "eval")),
         tmp_path / "eval", "evaluation output"),
    ]  # fmt: skip
    for main, cfg, folder, words in jobs:
        output = tmp_path / folder.relative_to(tmp_path).parts[0]
        held = DriverLease(str(folder), what="the same job, run before")
        with held, pytest.raises(LeaseHeld, match=f"{words} .* is in use by another driver"):
            main(cfg)
        assert not list(output.rglob("*.*"))  # nothing written, the lease given back
