"""One driver at a time for a job's folder (`jobs.lease`), on a local folder and on the moto
S3 server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from jobs import lease, storage
from jobs.lease import LEASE_DIR, DriverLease
from tests.support import ROOT


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3_server").url(f"lease-{request.node.name}")


def leases(url: str) -> list[str]:
    """The lease files' names, oldest first (not a renewal's temporary file, being written)."""
    found = storage.list_files(storage.join(url, LEASE_DIR))
    return sorted(u.rpartition("/")[2] for u in found if lease._generation(u))


def holder(url: str) -> dict | None:
    """The newest lease's holder."""
    names = leases(url)
    if not names:
        return None
    return json.loads(storage.read_bytes(storage.join(url, LEASE_DIR, names[-1])))


def plant(url: str, generation: int = 1, **fields) -> None:
    """A lease as another driver would have written it."""
    name = storage.join(url, LEASE_DIR, f"{generation:06d}.json")
    storage.write_bytes(name, json.dumps(fields).encode())


def ended_pid() -> int:
    ended = subprocess.Popen(["true"])
    ended.wait()
    return ended.pid


def test_a_second_driver_is_refused_and_the_first_gives_the_folder_back(folder) -> None:
    with DriverLease(folder, what="run r"):
        held = holder(folder)
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        me = f"process {os.getpid()} on {socket.gethostname()}"
        with pytest.raises(ValueError, match=f"run r is in use by another driver, {me}: stop it"):
            DriverLease(folder, what="run r").__enter__()
        assert holder(folder) == held  # the refused one took nothing
    assert leases(folder) == []
    if storage.is_local(folder):  # nor an empty folder left where the lease made one
        assert not os.path.exists(folder)
    with DriverLease(folder, what="run r"):  # free again
        assert holder(folder)["pid"] == os.getpid()


def test_the_holder_renews_its_lease_and_names_its_ray_job(folder, monkeypatch) -> None:
    monkeypatch.setattr(lease, "RENEW_S", 0.05)
    config = {"metadata": {"job_submission_id": "raysubmit_abc"}}  # as Ray's supervisor sets
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(config))
    with DriverLease(folder, what="run r"):
        deadline = time.monotonic() + 30
        while holder(folder)["renewals"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert holder(folder)["renewals"] >= 2 and holder(folder)["ray_job"] == "raysubmit_abc"
        with pytest.raises(ValueError, match=r"stop it \(`ray job stop raysubmit_abc`\)"):
            DriverLease(folder, what="run r").__enter__()


def test_a_lease_whose_holder_ended_on_this_machine_is_taken_over_at_once(folder, monkeypatch):
    """Its process is gone, ended and not yet waited for, or its id names a later process:
    nothing to wait for. The ended holder's lease goes, the taker's is the next."""

    def watched(self, url, holder):
        raise AssertionError("a lease of this machine was watched")

    monkeypatch.setattr(lease, "EXPIRE_S", 1000.0)
    zombie = subprocess.Popen(["true"])  # ended, not yet waited for
    while lease._process_stat(zombie.pid)[0] != "Z":
        time.sleep(0.01)
    cases = [(ended_pid(), None), (zombie.pid, None), (os.getpid(), "0")]  # "0": another's start
    for generation, (pid, start) in enumerate(cases, 1):
        plant(folder, generation, machine=lease.MACHINE, host="h", pid=pid, start=start)
        with DriverLease(folder, what="run r"):
            assert holder(folder)["pid"] == os.getpid()
            assert leases(folder) == [f"{generation + 1:06d}.json"]
    zombie.wait()


def test_another_machines_lease_is_taken_over_once_it_goes_unrenewed(folder, monkeypatch):
    monkeypatch.setattr(lease, "EXPIRE_S", 0.3)
    monkeypatch.setattr(lease, "WATCH_S", 0.05)
    other = {"machine": "0badf00d-x", "host": "node-7", "pid": 1, "ray_job": "raysubmit_x"}
    plant(folder, **other, renewals=5)
    with DriverLease(folder, what="run r"):  # it ended: its lease stays as it was
        assert holder(folder)["pid"] == os.getpid()

    # A renewal ends the watch as soon as it is seen; the watch is long, since the renewals
    # come from a thread of this process, which waits for a core as long as the watch does.
    monkeypatch.setattr(lease, "EXPIRE_S", 60.0)
    plant(folder, 7, **other, renewals=5)
    renewing = threading.Event()

    def renew() -> None:  # a driver that still runs
        n = 5
        while not renewing.wait(0.05):
            n += 1
            plant(folder, 7, **other, renewals=n)

    thread = threading.Thread(target=renew, daemon=True)
    thread.start()
    try:
        with pytest.raises(ValueError, match=r"process 1 on node-7, Ray job raysubmit_x: stop "
                           r"it \(`ray job stop raysubmit_x`\)"):  # fmt: skip
            DriverLease(folder, what="run r").__enter__()
    finally:
        renewing.set()
        thread.join()


def test_of_two_drivers_taking_over_one_ended_lease_one_wins(folder, monkeypatch) -> None:
    """Both find the holder ended; the next generation, created only where there is none,
    goes to the first, and the second then finds it held."""
    plant(folder, 1, machine=lease.MACHINE, host="h", pid=ended_pid())
    first, second = DriverLease(folder, what="run r"), DriverLease(folder, what="run r")
    ended = DriverLease._ended

    def ended_as_the_other_takes_over(self, url, holder, **kwargs):
        if self is second and first._url is None:
            first.__enter__()  # between the second's look and its taking over
        return ended(self, url, holder, **kwargs)

    monkeypatch.setattr(DriverLease, "_ended", ended_as_the_other_takes_over)
    try:
        with pytest.raises(ValueError, match=f"process {os.getpid()} on"):
            second.__enter__()
        assert holder(folder)["token"] == first._me["token"] and leases(folder) == ["000002.json"]
    finally:
        first.__exit__()


def test_a_create_whose_reply_was_lost_is_found_to_be_its_own(folder, monkeypatch) -> None:
    """The store wrote the lease and the reply was lost: the retry finds a file there, which
    is this driver's (not another's, by the same process id)."""
    create = storage.create_bytes

    def written_then_reply_lost(url, data, s3=None):
        create(url, data, s3)
        return False  # as a retried create meeting its own first write

    monkeypatch.setattr(storage, "create_bytes", written_then_reply_lost)
    with DriverLease(folder, what="run r") as held:
        assert holder(folder)["token"] == held._me["token"]


def test_a_store_without_conditional_writes_still_refuses_a_second_driver(folder, monkeypatch):
    """One that overwrites (If-None-Match ignored), or answers 501: the newest lease is read
    before one is written."""
    reply = Exception("NotImplemented")
    reply.response = {"ResponseMetadata": {"HTTPStatusCode": 501}}  # as botocore's errors
    not_implemented = OSError("501")
    not_implemented.__cause__ = reply

    def overwrites(url, data, s3=None):
        storage.write_bytes(url, data, s3)
        return True

    def refuses(url, data, s3=None):
        raise not_implemented

    for create in (overwrites, refuses):
        monkeypatch.setattr(storage, "create_bytes", create)
        with DriverLease(folder, what="run r") as first:
            with pytest.raises(ValueError):
                DriverLease(folder, what="run r").__enter__()
            assert holder(folder)["token"] == first._me["token"]


def test_a_holder_whose_lease_was_taken_over_stops_and_leaves_the_new_one(folder, monkeypatch):
    """Its renewals failed past the watch of a driver on another machine, which took the
    folder over: it stops its job rather than write beside the new driver, and neither its
    renewals nor its end touch the new lease."""
    monkeypatch.setattr(lease, "RENEW_S", 0.05)
    lost = threading.Event()
    with DriverLease(folder, what="run r", on_lost=lost.set):
        taker = {"machine": "0badf00d-x", "host": "node-7", "pid": 1, "token": "t"}
        plant(folder, 2, **taker)
        assert lost.wait(30)
        time.sleep(0.2)  # renewals it might still make
        assert holder(folder) == taker
    assert holder(folder) == taker and leases(folder) == ["000002.json"]  # its own gone


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
        with pytest.raises(ValueError, match=f"process {child.pid} on"):
            DriverLease(folder, what="run r").__enter__()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert holder(folder)["pid"] == child.pid  # left behind
    with DriverLease(folder, what="run r"):
        assert holder(folder)["pid"] == os.getpid()


HOLDER = """
import sys, time
from jobs import lease
lease.RENEW_S = float(sys.argv[2])
with lease.DriverLease(sys.argv[1], what="run r"):
    print("held", flush=True)
    if float(sys.argv[3]) < 0:  # until told
        sys.stdin.readline()
    else:
        time.sleep(float(sys.argv[3]))
"""


def hold_in_a_child(folder: str, renew_s: float = 15.0, hold_s: float = 600.0):
    """Another driver of this machine holding `folder`, once it has said so (`hold_s` < 0:
    until a line on its stdin)."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER, folder, str(renew_s), str(hold_s)],
                             cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert child.stdout.readline().strip() == "held", child.stderr.read()
    return child


def test_a_driver_that_waits_takes_the_folder_once_the_other_gives_it_back(
    folder, monkeypatch, capsys
) -> None:
    """(As runs sharing the sample data wait for the one making it.) The other gives it back
    once this one waits. One that would wait for itself is refused instead."""
    child = hold_in_a_child(folder, hold_s=-1)
    waiting = threading.Event()
    describe = lease._describe  # named as the wait starts
    monkeypatch.setattr(lease, "_describe", lambda held: waiting.set() or describe(held))

    def give_back() -> None:
        waiting.wait(60)
        child.stdin.write("done\n")
        child.stdin.flush()

    threading.Thread(target=give_back, daemon=True).start()
    with DriverLease(folder, what="the sample data", wait=True) as waited:
        assert waiting.is_set() and child.wait(60) == 0
        assert f"the sample data: waiting for process {child.pid}" in capsys.readouterr().out
        assert holder(folder)["token"] == waited._me["token"]
        with pytest.raises(ValueError, match="held by this driver itself, which would wait"):
            DriverLease(folder, what="the sample data", wait=True).__enter__()


def test_a_holder_stops_when_its_lease_is_rewritten_or_goes_unrenewed(folder, monkeypatch):
    """Rewritten by a driver on a store that overwrites; unrenewed past `FENCE_S`, after
    which a driver elsewhere may take the folder over before this one can tell."""
    monkeypatch.setattr(lease, "RENEW_S", 0.05)
    monkeypatch.setattr(lease, "EXPIRE_S", 0.3)  # the rewriter's lease, ended: taken over
    monkeypatch.setattr(lease, "WATCH_S", 0.05)
    lost = threading.Event()
    with DriverLease(folder, what="run r", on_lost=lost.set):  # (FENCE_S as it is: 45 s)
        other = {"machine": "0badf00d-x", "host": "node-7", "pid": 1, "token": "t"}
        plant(folder, 1, **other)  # its own generation, written over
        assert lost.wait(30)
    assert holder(folder) == other  # left to its writer
    monkeypatch.setattr(lease, "FENCE_S", 0.3)
    lost.clear()
    with DriverLease(folder, what="run r", on_lost=lost.set):

        def unreachable(*args, **kwargs):
            raise ConnectionError("the store is unreachable")

        monkeypatch.setattr(storage, "list_files", unreachable)
        assert lost.wait(30)
        monkeypatch.undo()
    # A renewal whose storage call hangs (retried with long time-outs) is not waited for
    lost.clear()
    monkeypatch.setattr(lease, "RENEW_S", 0.05)
    monkeypatch.setattr(lease, "FENCE_S", 0.3)
    release = threading.Event()
    with DriverLease(folder, what="run r", on_lost=lost.set):
        listed = storage.list_files

        def hanging(*args, **kwargs):
            release.wait(60)
            return listed(*args, **kwargs)

        monkeypatch.setattr(storage, "list_files", hanging)
        assert lost.wait(30)
        release.set()
    monkeypatch.undo()


def test_a_driver_that_lost_its_lease_ends_at_once(tmp_path) -> None:
    """Not a Ctrl-C, which Ray's handlers turn into an orderly end that writes on."""
    folder = str(tmp_path / "run")
    child = hold_in_a_child(folder, renew_s=0.05)
    try:
        plant(folder, 2, machine="0badf00d-x", host="node-7", pid=1, token="t")
        assert child.wait(60) == lease.LOST_EXIT_STATUS
        assert "another driver took the folder over" in child.stderr.read()
    finally:
        child.kill()
        child.wait()


def test_a_newer_lease_met_while_watching_is_read_next(folder, monkeypatch) -> None:
    """Another driver took an ended holder's folder over while this one watched it: the watch
    ends at the newer lease, which is judged next (renewed here: held), and none is made."""
    monkeypatch.setattr(lease, "EXPIRE_S", 60.0)  # (ends when the newer lease is seen)
    monkeypatch.setattr(lease, "WATCH_S", 0.05)
    plant(folder, 1, machine="0badf00d-x", host="node-7", pid=1)
    renewing = threading.Event()

    def take_over_and_renew() -> None:
        n = 0
        while not renewing.wait(0.05):
            n += 1
            plant(folder, 2, machine="0badf00d-y", host="node-8", pid=2, renewals=n)

    thread = threading.Thread(target=take_over_and_renew, daemon=True)
    watched, ended = [], DriverLease._ended

    def watch(self, url, holder, **kwargs):  # the other driver takes over once this one watches
        watched.append(url.rpartition("/")[2])
        if len(watched) == 1:
            thread.start()
        return ended(self, url, holder, **kwargs)

    def create(self, url):
        raise AssertionError(f"a lease was made ({url}) beside a held one")

    monkeypatch.setattr(DriverLease, "_ended", watch)
    monkeypatch.setattr(DriverLease, "_create", create)
    try:
        with pytest.raises(ValueError, match="process 2 on node-8"):
            DriverLease(folder, what="run r").__enter__()
    finally:
        renewing.set()
        if thread.is_alive():
            thread.join()
    assert watched == ["000001.json", "000002.json"]


def test_a_host_of_the_same_name_booted_apart_is_another_machine(folder, monkeypatch) -> None:
    """Its process ids are its own: watched, not looked up here (this test's own id, alive
    here, would otherwise hold the folder)."""
    monkeypatch.setattr(lease, "EXPIRE_S", 0.3)
    monkeypatch.setattr(lease, "WATCH_S", 0.05)
    plant(folder, 1, machine=f"{storage.MACHINE}-00000000", host=socket.gethostname(),
          pid=os.getpid())  # fmt: skip
    with DriverLease(folder, what="run r") as held:
        assert holder(folder)["token"] == held._me["token"]


def test_a_lease_file_written_without_a_condition_is_not_created_twice(folder, monkeypatch):
    """The plain write of a store that answers 501 to If-None-Match looks first."""
    url = storage.join(folder, LEASE_DIR, "000001.json")
    storage.write_bytes(url, b"{}")
    reply = Exception("NotImplemented")
    reply.response = {"ResponseMetadata": {"HTTPStatusCode": 501}}  # as botocore's errors
    refused = OSError("501")
    refused.__cause__ = reply

    def refuses(url, data, s3=None):
        raise refused

    driver = DriverLease(folder, what="run r")
    monkeypatch.setattr(storage, "create_bytes", refuses)
    assert driver._create(url) is False and storage.read_bytes(url) == b"{}"
    fresh = storage.join(folder, LEASE_DIR, "000002.json")
    assert driver._create(fresh) is True
    assert json.loads(storage.read_bytes(fresh))["token"] == driver._me["token"]


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
        with held, pytest.raises(ValueError, match=f"{words} .* is in use by another driver"):
            main(cfg)
        assert not output.exists()  # nothing written, nor a folder left
