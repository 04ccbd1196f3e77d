"""Jobs run as their users run them: the README's main command, an interrupted run resumed by
re-running the same command, and `ray job submit` to a `ray start --head` cluster.

These start their own Ray instances, so `.ci/run` runs them in a second phase (marker
`subprocess`), after the in-process tests' Ray instance has shut down.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from jobs import storage, train
from jobs.models import CHECKPOINT_FILE, checkpoint_dir_name
from jobs.tune import TUNE_STATE_PREFIX
from tests.support import ROOT, free_ports

pytestmark = pytest.mark.subprocess
ENV = os.environ | {"RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def run(args: list[str], cwd: Path, timeout: float = 600) -> str:
    done = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    return output


def kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started (the job's driver and its local Ray)."""
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    for proc in [*parent.children(recursive=True), parent]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


@pytest.fixture(scope="module")
def workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="colorcore-jobs-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_readme_main_command(workdir) -> None:
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/smoke.sh" in readme and "bash scripts/test.sh" in readme
    # scripts/smoke.sh = set-up (done: this suite runs in it) + this command
    assert "jobs.train --preset smoke" in (ROOT / "scripts" / "smoke.sh").read_text()
    out = run(train_command(workdir, "smoke"), cwd=ROOT)
    summary = re.search(r"rebalanced AuC model ([\d.]+) vs gray ([\d.]+)", out)
    assert summary, out[-3000:]
    assert float(summary[1]) > float(summary[2]) + 0.05
    assert "the model beats the gray baseline" in out
    progress = re.findall(r"(?<![\w'])step=(\d+) ", out)  # the workers' progress lines
    assert progress and len(progress) == len(set(progress)), progress  # each shown once


def train_command(workdir: Path, preset: str, *flags: str) -> list[str]:
    """`python -m jobs.train` on the module's shared sample data and run folder."""
    return [
        sys.executable,
        "-m",
        "jobs.train",
        "--preset",
        preset,
        *flags,
        "--data",
        str(workdir / "sample" / "train"),
        "--val-data",
        str(workdir / "sample" / "val"),
        "--storage",
        str(workdir / "runs"),
    ]


def ci_command(workdir: Path, name: str) -> list[str]:
    return train_command(workdir, "ci", "--name", name)


def whole(checkpoint: str) -> bool:
    """Whether the checkpoint file is there and loads (not one being written)."""
    from colorcore.weights import load_checkpoint
    from jobs.models import TORN

    try:
        with open(checkpoint, "rb") as f:
            load_checkpoint(f)
    except (OSError, *TORN):
        return False
    return True


def test_interrupted_job_resumes_when_the_same_command_runs_again(workdir) -> None:
    command = ci_command(workdir, "interrupted")
    first = storage.join(
        str(workdir / "runs" / "interrupted"), checkpoint_dir_name(20), CHECKPOINT_FILE
    )
    proc = subprocess.Popen(
        command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    # Killed once the first checkpoint is whole: Ray copies it into a local run folder file
    # by file, and a run whose only checkpoint was cut short refuses to start over.
    while not whole(first) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert whole(first), "no checkpoint before the deadline"
    assert proc.poll() is None, "the job ended before it could be interrupted"
    kill_tree(proc.pid)
    proc.wait()

    out = run(command, cwd=ROOT)
    assert "finished at step 40" in out
    history = train.read_metrics(str(workdir / "runs" / "interrupted"))
    assert [int(r["step"]) for r in history] == [10, 20, 30, 40]  # nothing repeated or lost
    resumed_at = re.search(r"train: resumed from step (\d+)", out)
    assert resumed_at and 20 <= int(resumed_at[1]) < 40, out[-3000:]  # not from 0, nor done

    # The same run with other batches is refused before Ray starts.
    changed = subprocess.run(
        [*command, "--seed", "7"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert changed.returncode != 0 and "started with other seed" in changed.stderr
    assert "Started a local Ray instance" not in changed.stderr


def test_data_jobs_as_commands_prepare_prior_and_evaluate(workdir) -> None:
    """prepare, prior and evaluate run as their users run them, `python -m` (a job's classes
    are then pickled for its Ray workers from the importable module, not from __main__), on a
    tree of photos with a broken file; a user's mistake ends in one line, not a traceback."""
    from colorcore.model import ColorizationNet, ModelConfig
    from colorcore.weights import to_safetensors
    from tests.support import encode, photo_rgb

    src, data, report = workdir / "photos", workdir / "photos-data", workdir / "photos-eval"
    for i, name in enumerate(("astronaut", "chelsea", "coffee", "rocket")):
        folder = src / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.jpg").write_bytes(encode(photo_rgb(name, 300)))
    (src / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not a picture")
    job = [sys.executable, "-m"]
    out = run([*job, "jobs.prepare", str(src), str(data)], cwd=ROOT)
    assert "5 inputs -> 4 images in 1 shards + 1 errors" in out, out[-3000:]
    run([*job, "jobs.prior", str(data)], cwd=ROOT)
    missing = [*job, "jobs.evaluate", "--model", str(workdir / "nope"), str(data)]
    # (read at the end: it fails before Ray starts, beside the evaluation below)
    refused = subprocess.Popen(missing, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    model = workdir / "tiny.safetensors"
    model.write_bytes(to_safetensors(ColorizationNet(ModelConfig(width=1 / 16))))
    run([*job, "jobs.evaluate", "--model", str(model), str(data), "--output", str(report)], ROOT)
    result = json.loads((report / "results.json").read_text())
    assert result["counts"]["measured"] == 4 and len(result["images"]) == 4
    for name in ("table.md", "auc_curves.png", "best_worst.png"):
        assert (report / name).stat().st_size > 0, name

    _, stderr = refused.communicate(timeout=120)
    assert refused.returncode == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("python -m jobs.evaluate: error: --model ")


def test_ray_job_submit_to_a_started_cluster(workdir) -> None:
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths
    port, dashboard = free_ports(2)
    env_bin = str(Path(sys.executable).parent)
    env = ENV | {"PATH": f"{env_bin}:{ENV['PATH']}"}
    start = [
        f"{env_bin}/ray",
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--dashboard-port={dashboard}",
        "--dashboard-host=127.0.0.1",
        "--num-cpus=2",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
    ]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    try:
        submit = [
            f"{env_bin}/ray",
            "job",
            "submit",
            f"--address=http://127.0.0.1:{dashboard}",
            "--working-dir",
            str(ROOT),
            "--",
            "python",
            *ci_command(workdir, "submitted")[1:],
        ]
        done = subprocess.run(
            submit, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-5000:]
        assert "succeeded" in output and "finished at step 40" in output
        # a one-node cluster may keep runs on its disk, but the job says what that risks
        assert "is a local path and this job joins the Ray cluster" in output
    finally:
        for proc in psutil.process_iter(["cmdline"]):
            if str(temp) in " ".join(proc.info["cmdline"] or []):
                kill_tree(proc.pid)
        shutil.rmtree(temp, ignore_errors=True)
    assert storage.exists(
        storage.join(str(workdir / "runs" / "submitted"), checkpoint_dir_name(40), CHECKPOINT_FILE)
    )


def test_killed_search_continues_without_rerunning_finished_trials(workdir) -> None:
    search_url = workdir / "searches" / "resumed"
    command = [
        sys.executable,
        "-m",
        "jobs.tune",
        "--preset",
        "ci",
        "--name",
        "resumed",
        "--storage",
        str(workdir / "searches"),
        "--train.data",
        str(workdir / "sample" / "train"),
        "--train.val-data",
        str(workdir / "sample" / "val"),
        "--lambdas",
        "0.5",  # two trials: lr 1e-3 and lr 0
        "--scheduler",
        "fifo",  # every trial runs to its end: a finished trial is one at step 40
        "--train.num-workers",
        "1",  # (each worker a trial starts costs seconds here)
        "--max-concurrent",
        "1",
    ]
    finished = f"trials/*/{checkpoint_dir_name(40)}/{CHECKPOINT_FILE}"
    # Tune's saves of its state are at least 10 s apart by default; here a second, so that
    # it records the first trial as finished soon after it is
    proc = subprocess.Popen(
        command, cwd=ROOT, env=ENV | {"TUNE_GLOBAL_CHECKPOINT_S": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 400
    while proc.poll() is None and time.monotonic() < deadline:
        if "TERMINATED" in _saved_trial_statuses(search_url):
            break
        time.sleep(0.2)
    kill_tree(proc.pid)
    proc.wait()
    done_before = {p.parts[-3] for p in search_url.glob(finished)}
    assert done_before, "no trial finished before the deadline"

    out = run(command, cwd=ROOT, timeout=900)
    assert "continuing search resumed" in out
    started = set(re.findall(r"tune: trial (\S+) starts", out))
    assert started and not started & done_before, (started, done_before)
    rows = [line for line in out.splitlines() if re.match(r"\| \w+_\d{5} \|", line)]
    assert len(rows) == 2 and all(line.rstrip().endswith("| completed |") for line in rows), rows


def _saved_trial_statuses(search: Path) -> list[str]:
    """The trials' statuses in Tune's newest saved state of the search (none while it has
    saved none, or while one is being written)."""
    states = sorted(search.glob(f"{TUNE_STATE_PREFIX}*.json"))
    try:
        trials = json.loads(states[-1].read_text())["trial_data"] if states else []
        return [json.loads(state)["status"] for state, _ in trials]
    except (OSError, ValueError, KeyError):
        return []


def test_a_resumed_run_ends_as_the_same_run_uninterrupted(workdir) -> None:
    """The run killed and resumed above and the run submitted to a cluster are one `ci` run
    (same data, seed and settings): the resumed one restored its weights, optimizer, data
    offset and random state exactly when it ends with the same weights and figures."""
    import torch

    from colorcore.weights import load_checkpoint

    ends = {}
    for name in ("interrupted", "submitted"):
        url = storage.join(str(workdir / "runs" / name), checkpoint_dir_name(40), CHECKPOINT_FILE)
        if not storage.exists(url):
            pytest.skip(f"needs the {name!r} run of the tests above")
        with open(url, "rb") as f:
            ends[name] = load_checkpoint(f)
    resumed, whole = ends["interrupted"], ends["submitted"]
    for key in ("step", "epoch", "offset"):
        assert resumed.extra[key] == whole.extra[key], key
    assert resumed.model_state.keys() == whole.model_state.keys()
    for key, value in whole.model_state.items():
        assert torch.equal(resumed.model_state[key], value), key
    mine, theirs = (c.extra["optimizer"]["state"] for c in (resumed, whole))  # Adam's moments
    assert mine.keys() == theirs.keys()
    for index, state in theirs.items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(mine[index][key]), torch.as_tensor(value)), key

    def figures(checkpoint) -> list[dict]:  # every logged figure but the speed
        rows = checkpoint.extra["history"]
        return [{k: v for k, v in row.items() if k != "img_per_s"} for row in rows]

    assert figures(resumed) == figures(whole)
