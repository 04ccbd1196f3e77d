"""`python -m jobs.colorize` killed part-way (driver and its local Ray) and run again: every
input ends up in the output and the manifest exactly once.

Starts its own Ray instance, so `.ci/run` runs it in the second phase (marker `subprocess`).
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from colorcore import weights
from colorcore.model import ColorizationNet, ModelConfig
from jobs import colorize_manifest
from tests.support import encode, photo_rgb, tar_bytes
from tests.test_colorize import gray
from tests.test_subprocess_jobs import ENV, ROOT, kill_tree, run

pytestmark = pytest.mark.subprocess


def test_killed_run_completed_by_the_same_command(tmp_path: Path) -> None:
    """Folders, a tar read by one task and a zip split into parts read by several."""
    torch.manual_seed(0)
    weights.save_checkpoint(str(tmp_path / "tiny.pt"), ColorizationNet(ModelConfig(width=1 / 16)))
    src = tmp_path / "scans"
    for i in range(12):
        (src / f"box{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / f"box{i % 3}" / f"scan{i:02d}.jpg").write_bytes(encode(gray((20 + i, 24))))
    members = {
        f"roll/frame{i:02d}.png": encode(photo_rgb("coffee", 16 + i), "PNG") for i in range(8)
    }
    (src / "film.tar").write_bytes(tar_bytes(members))
    with zipfile.ZipFile(src / "album.zip", "w") as album:  # read in parts (--archive-part-mb)
        for i in range(8):
            album.writestr(f"page{i}.png", encode(photo_rgb("chelsea", 16 + i), "PNG"))
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    expected_inputs = 12 + 8 + 8 + 1
    dst = tmp_path / "colour"
    command = [
        sys.executable, "-m", "jobs.colorize", str(src), str(dst),
        "--model", str(tmp_path / "tiny.pt"), "--infer-px", "64", "--batch-size", "1",
        "--files-per-task", "2", "--model-actors", "1", "--actor-cpus", "0.5",
        "--task-cpus", "0.25", "--archive-part-mb", "0.001",
    ]  # fmt: skip
    parts = dst / colorize_manifest.PARTS_DIR
    proc = subprocess.Popen(
        command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if parts.exists() and len(list(parts.glob("*.parquet"))) >= 4:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the job finished before it could be killed"
    kill_tree(proc.pid)
    proc.wait()
    rows = colorize_manifest.read(str(dst), None)
    done_before = sum(
        s not in colorize_manifest.NOT_INPUTS for s in rows.column("status").to_pylist()
    )
    assert 0 < done_before < expected_inputs

    out = run(command, cwd=ROOT, timeout=300)
    skipped = re.search(r"(\d+) inputs already done", out)
    assert skipped and int(skipped[1]) == done_before, out[-3000:]
    assert f"{expected_inputs} inputs = {expected_inputs - 1} outputs + 1 errors" in out

    manifest = pq.read_table(io.BytesIO((dst / "_colorize" / "manifest.parquet").read_bytes()))
    sources = manifest.column("source").to_pylist()
    assert len(sources) == len(set(sources)) == expected_inputs  # each input exactly once
    files = sorted(
        str(p.relative_to(dst))
        for p in dst.rglob("*")
        if p.is_file() and "_colorize" not in p.parts
    )
    outputs = sorted(o for o in manifest.column("output").to_pylist() if o)
    assert files == outputs and len(outputs) == expected_inputs - 1  # no strays, no duplicates
    assert len(list(parts.glob("*.parquet"))) == 1  # the parts of both runs folded into one
    read = colorize_manifest.archives_read(colorize_manifest.compact(str(dst), None))
    album = (src / "album.zip").stat().st_size
    assert read[str(src / "album.zip")] == (8, album)  # read through, once all its parts were


def test_a_ray_instance_of_one_cpu_colorizes_a_tar(tmp_path: Path) -> None:
    """The model actor takes half the CPU and the reads an eighth: no stage of the pipeline
    may ask for a whole one (it would wait for ever)."""
    torch.manual_seed(0)
    weights.save_checkpoint(str(tmp_path / "tiny.pt"), ColorizationNet(ModelConfig(width=1 / 16)))
    (tmp_path / "in").mkdir()
    members = {f"roll/frame{i:02d}.jpg": encode(gray((30, 40 + i))) for i in range(12)}
    (tmp_path / "in" / "roll.tar").write_bytes(tar_bytes(members))
    script = f"""
import ray
from jobs import colorize
ray.init(address="local", num_cpus=1, include_dashboard=False)
cfg = colorize.ColorizeConfig(input={str(tmp_path / "in")!r}, output={str(tmp_path / "out")!r},
                              model={str(tmp_path / "tiny.pt")!r})
print("outputs", colorize.main(cfg).outputs)
"""
    out = run([sys.executable, "-c", script], cwd=ROOT, timeout=180)
    assert "outputs 12" in out
