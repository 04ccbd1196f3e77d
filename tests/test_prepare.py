"""Dataset preparation: layouts, bad inputs, reconciliation, resume without duplicates."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, JpegImagePlugin

from jobs import prepare, storage, tars
from jobs.dataset import Manifest, validate_shard_table
from tests.support import ROOT, encode, photo_rgb, tar_bytes, write_image_tree


def planted_corpus() -> dict[str, bytes]:
    """Relative path -> bytes: valid images of several kinds and planted bad files."""
    astronaut, coffee = photo_rgb("astronaut"), photo_rgb("coffee")
    good = {
        "cat/big.jpg": encode(astronaut),  # 512 px: reduced to the short side
        "cat/small.jpg": encode(astronaut[:40, :60], subsampling=0),  # kept byte for byte
        "cat/drawing.png": encode(coffee[:50, :70], "PNG"),
        "dog/gray.jpg": encode(np.asarray(Image.fromarray(coffee).convert("L"))),
        "dog/photo.jpg": encode(coffee[:120, :90]),
        "dog/rgba.png": encode(
            np.dstack([coffee[:30, :30], np.full((30, 30), 128, np.uint8)]), "PNG"
        ),
        # 16-bit gray at half scale: stored as mid-gray, not clipped to white
        "dog/gray16.png": encode(np.full((20, 24), 32768, np.uint16), "PNG"),
    }
    truncated = encode(coffee)
    bad = {
        "cat/empty.jpg": b"",
        "cat/truncated.jpg": truncated[: len(truncated) // 2],
        "dog/notes.txt": b"not an image at all",
        "dog/huge.png": encode(np.zeros((500, 700, 3), np.uint8), "PNG"),  # above max_pixels
        "dog/wide.png": encode(np.zeros((4, 66_000), np.uint8), "PNG"),  # too wide for JPEG
        "cat/garbled.ppm": b"P6\n4 4\n255\xa9\n" + bytes(48),  # PPM header the parser chokes on
        "dog/heavy.png": encode(  # above max_file_mb (noise does not compress)
            np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8), "PNG"
        ),
    }
    return good | bad


BAD_REASONS = {
    "cat/empty": "empty file",
    "cat/truncated": "truncated",
    "dog/notes": "not an image",
    "dog/huge": "too large",
    "dog/wide": "JPEG sides end at 65,500",
    "cat/garbled": "unreadable image",
    "dog/heavy": "file too large",
}


def read_rows(dataset: str, manifest: Manifest) -> list[dict]:
    rows = []
    for shard in manifest.shards:
        table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(dataset, shard.name))))
        validate_shard_table(table)
        rows += table.to_pylist()
    return rows


def shard_digests(dataset: str, manifest: Manifest) -> dict[str, str]:
    return {s.name: s.sha256 for s in manifest.shards}


def config(src: str, dst: str, **kw) -> prepare.PrepareConfig:
    kw = {
        "short_side_px": 64,
        "max_group_images": 3,
        "max_pixels": 300_000,
        "max_file_mb": 0.1,
        "cpus_per_task": 0.5,
    } | kw
    return prepare.PrepareConfig(src=src, dst=dst, **kw)


def test_s3_to_s3_with_planted_bad_files(s3_server, ray_session) -> None:
    """The planted corpus, and a file whose decoding kills the task (a format the session's
    workers die on): its group's task gives it up after crash_tries careful deaths and
    converts the rest. (A group's task is tried 1 + TASK_RETRIES times a run: enough for
    the default crash_tries, the first attempt and the one that gives the input up.)"""
    from tests.crashing_format import MAGIC

    needed = 1 + prepare.PrepareConfig.crash_tries + 1  # first, careful deaths, giving up
    assert needed <= 1 + prepare.TASK_RETRIES
    # in a group with two bad files: they are not charged for its deaths
    corpus = planted_corpus() | {"dog/huge-crashes.png": MAGIC + bytes(64)}
    reasons = BAD_REASONS | {"dog/huge-crashes": "died each of the 1 times it took this input"}
    src, dst = s3_server.url("prep-src"), s3_server.url("prep-dst")
    for rel, data in corpus.items():
        storage.write_bytes(storage.join(src, rel), data)
    manifest = prepare.main(config(src, dst, crash_tries=1))

    assert manifest.num_inputs == len(corpus) == manifest.num_rows + manifest.num_errors
    assert manifest.classes == ("cat", "dog")
    errors = json.loads(storage.read_bytes(storage.join(dst, prepare.ERRORS_FILE)))
    assert {e["key"] for e in errors} == set(reasons)
    for e in errors:
        assert reasons[e["key"]] in e["reason"], e
        assert e["source"].startswith(src)
    assert not storage.list_files(storage.join(dst, prepare.WORK_DIR, "crashes"))

    rows = {r["key"]: r for r in read_rows(dst, manifest)}
    assert set(rows) == {k.rsplit(".", 1)[0] for k in corpus} - set(reasons)
    assert len(manifest.shards) >= 2  # several groups ran as separate tasks
    for key, row in rows.items():
        image = Image.open(io.BytesIO(row["jpeg"]))
        assert image.format == "JPEG" and image.size == (row["width_px"], row["height_px"])
        assert min(image.size) <= 64, key
        assert row["label"] == manifest.classes.index(key.split("/")[0])
    small = rows["cat/small"]
    assert small["jpeg"] == corpus["cat/small.jpg"]  # already small enough: kept as it was
    big = Image.open(io.BytesIO(rows["cat/big"]["jpeg"]))
    assert big.size == (64, 64) and JpegImagePlugin.get_sampling(big) == 0  # 4:4:4
    assert rows["dog/gray"]["grayscale"] and not rows["dog/photo"]["grayscale"]
    gray16 = np.asarray(Image.open(io.BytesIO(rows["dog/gray16"]["jpeg"])))
    assert rows["dog/gray16"]["grayscale"] and abs(gray16.mean() - 128) < 2
    assert manifest.num_grayscale == 2
    assert [r["key"] for r in rows.values()].count("cat/big") == 1


def test_interrupted_run_resumes_to_identical_shards(tmp_path, ray_session) -> None:
    src = tmp_path / "src"
    for rel, data in planted_corpus().items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    clean = prepare.main(config(str(src), str(tmp_path / "clean")))

    # an earlier run died after finishing group 0 and half-writing group 1 (shards, no marker)
    cfg = config(str(src), str(tmp_path / "resumed"))
    classes, groups = prepare.plan(cfg)
    prepare._check_resumable(cfg, classes, groups)
    prepare.process_group(0, groups[0], cfg)
    prepare.process_group(1, groups[1], cfg)
    storage.filesystem(cfg.dst)[0].rm(prepare._marker_url(cfg, 1))
    resumed = prepare.main(cfg)

    assert shard_digests(cfg.dst, resumed) == shard_digests(str(tmp_path / "clean"), clean)
    keys = [r["key"] for r in read_rows(cfg.dst, resumed)]
    assert len(keys) == len(set(keys)) == clean.num_rows
    for spelled in (f"{src}/", f"file://{src}"):  # the same source, spelled otherwise
        prepare._check_resumable(config(spelled, cfg.dst), classes, groups)
    with pytest.raises(ValueError, match="prepared from other src"):
        prepare._check_resumable(config(str(tmp_path / "elsewhere"), cfg.dst), classes, groups)
    with pytest.raises(ValueError, match="prepared from other short_side_px"):
        prepare.main(config(str(src), cfg.dst, short_side_px=128))
    (src / "cat" / "late.png").write_bytes(encode(np.zeros((40, 40, 3), np.uint8), "PNG"))
    with pytest.raises(ValueError, match="prepared from other plan_sha256"):
        prepare.main(cfg)
    # Tasks no node here can hold: Ray would wait for ever (and the local instance has no
    # autoscaler to start a larger node).
    huge = r"0.5 CPUs .* and \d+\.\d GiB .* holds 0 \(2 CPUs, 0 GPUs, \d+\.\d GiB\)"
    with pytest.raises(ValueError, match=huge):
        prepare.main(config(str(src), str(tmp_path / "huge"), max_pixels=10**13))
    with pytest.raises(ValueError, match=r"asks for 64 CPUs .* lower --cpus-per-task"):
        prepare.main(config(str(src), str(tmp_path / "wide"), cpus_per_task=64))


def test_a_group_that_fails_costs_itself_only(tmp_path, ray_session, capsys) -> None:
    """A group whose read still fails after the retries (a symlink loop standing in for a
    storage fault) fails the job, naming it, once the other groups are done; the same command
    then does that group alone."""
    src = tmp_path / "src"
    for rel, data in planted_corpus().items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    (src / "cat" / "a-loop.jpg").symlink_to("a-loop.jpg")  # the first group's
    (tmp_path / "empty").write_bytes(b"")
    cfg = config(str(src), str(tmp_path / "ds"))
    _, groups = prepare.plan(cfg)
    first = re.escape(prepare._group_source(groups[0]))
    with pytest.raises(RuntimeError, match=rf"1 of {len(groups)} groups failed .*: {first}\)"):
        prepare.main(cfg)
    done = [storage.exists(prepare._marker_url(cfg, i)) for i in range(len(groups))]
    assert done == [False] + [True] * (len(groups) - 1)

    (src / "cat" / "a-loop.jpg").unlink()  # the fault gone: a zero-byte file, as listed
    (src / "cat" / "a-loop.jpg").symlink_to(tmp_path / "empty")
    capsys.readouterr()
    manifest = prepare.main(cfg)
    assert f"({len(groups) - 1} already done)" in capsys.readouterr().out
    assert manifest.num_inputs == len(planted_corpus()) + 1
    assert manifest.num_inputs == manifest.num_rows + manifest.num_errors


def test_tar_of_per_class_tars(tmp_path, ray_session) -> None:
    outer = tmp_path / "train.tar"
    with tarfile.open(outer, "w") as out:
        for cls, photo in (("n01", "chelsea"), ("n02", "rocket")):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as t:
                for i in range(2):
                    data = encode(photo_rgb(photo)[i * 50 : i * 50 + 80, :100])
                    info = tarfile.TarInfo(f"{cls}_{i}.JPEG")
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
                info = tarfile.TarInfo(f"{cls}_broken.JPEG")
                info.size = 5
                t.addfile(info, io.BytesIO(b"\xff\xd8\xff\x00\x00"))
                if cls == "n01":  # the key n01/n01_0 again
                    info = tarfile.TarInfo(f"{cls}_0.png")
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
                else:  # above max_file_mb: refused unread
                    info = tarfile.TarInfo(f"{cls}_big.JPEG")
                    info.size = 200_000
                    t.addfile(info, io.BytesIO(bytes(200_000)))
            info = tarfile.TarInfo(f"{cls}.tar")
            info.size = inner.tell()
            inner.seek(0)
            out.addfile(info, inner)
        info = tarfile.TarInfo("n03.tar")  # a class's tar that is not a tar
        info.size = 1024
        out.addfile(info, io.BytesIO(b"\x01" * 1024))
        info = tarfile.TarInfo("./._n00.tar")  # macOS's metadata of n00.tar: no class
        info.size = 512
        out.addfile(info, io.BytesIO(bytes(512)))
    manifest = prepare.main(config(str(outer), str(tmp_path / "ds")))
    assert manifest.classes == ("n01", "n02", "n03")
    assert (manifest.num_inputs, manifest.num_rows, manifest.num_errors) == (9, 4, 5)
    errors = json.loads(storage.read_bytes(storage.join(str(tmp_path / "ds"), prepare.ERRORS_FILE)))
    assert any(e["key"] == "n03/" and "unreadable tar" in e["reason"] for e in errors), errors
    assert any(e["source"].endswith("n01_0.png") and "key" in e["reason"] for e in errors)
    assert any(e["key"] == "n02/n02_big" and "too large" in e["reason"] for e in errors)
    rows = read_rows(str(tmp_path / "ds"), manifest)
    assert sorted(r["key"] for r in rows) == ["n01/n01_0", "n01/n01_1", "n02/n02_0", "n02/n02_1"]
    assert {r["label"] for r in rows if r["key"].startswith("n02")} == {1}


def test_a_damaged_class_tar_keeps_its_good_members(tmp_path) -> None:
    """A class tar cut inside a member's bytes: that member is an error row. Cut inside a
    header, or between members without the end-of-archive marker: the members before are
    kept and the class tar gets an error row for what may follow (tarfile ends quietly)."""
    jpegs = [encode(photo_rgb("chelsea")[i * 20 : i * 20 + 60, :80]) for i in range(4)]
    whole = tar_bytes({f"img_{i}.JPEG": data for i, data in enumerate(jpegs)})
    last_header = whole.index(b"img_3.JPEG")
    cuts = {
        "n01": whole[: last_header + 512 + 100],  # inside img_3's bytes
        "n02": whole[: last_header + 200],  # inside img_3's header
        "n03": whole[:last_header],  # before img_3's header
    }
    outer = tmp_path / "train.tar"
    outer.write_bytes(tar_bytes({f"{cls}.tar": data for cls, data in cuts.items()}))
    cfg = config(str(outer), str(tmp_path / "ds"))
    _, groups = prepare.plan(cfg)
    whole = outer.read_bytes()
    cut_outer = tmp_path / "cut.tar"  # the outer tar itself cut inside n03's header
    cut_outer.write_bytes(whole[: whole.index(b"n03.tar") + 100])
    with pytest.raises(ValueError, match=r"the tar is damaged after n02\.tar"):
        prepare.plan(config(str(cut_outer), str(tmp_path / "ds")))
    for cls, group in zip(cuts, groups, strict=True):
        rows = list(prepare._group_inputs(group, cfg))
        assert [r[0] for r in rows[:3]] == [f"{cls}/img_{i}" for i in range(3)]
        assert [r[3] for r in rows[:3]] == jpegs[:3]
        [(key, _, source, error)] = rows[3:]
        if cls == "n01":
            assert key == "n01/img_3" and "unreadable tar member" in str(error)
        else:
            assert key == f"{cls}/" and source.endswith(f"!{cls}.tar")
            assert "unreadable tar after img_2.JPEG" in str(error)
    assert "end-of-archive marker" in str(error)


def test_odd_class_tar_members_are_error_rows_and_class_names_are_one_each(tmp_path) -> None:
    """A header whose pax field is not a number ends the class tar's listing as damage (not
    the task: every run would fail it again); a link member is an input, refused; two class
    tars of one name in other folders are refused before any work."""
    jpeg = encode(photo_rgb("chelsea")[:60, :80])
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, extra in (("a.JPEG", {}), ("b.JPEG", {"GNU.sparse.map": "abc"})):
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(jpeg), extra
            t.addfile(info, io.BytesIO(jpeg))
    linked = io.BytesIO()
    with tarfile.open(fileobj=linked, mode="w") as t:
        info = tarfile.TarInfo("a.JPEG")
        info.size = len(jpeg)
        t.addfile(info, io.BytesIO(jpeg))
        link = tarfile.TarInfo("a.GIF")  # listed before a.JPEG, of the same key
        link.type, link.linkname = tarfile.LNKTYPE, "a.JPEG"
        t.addfile(link)
    outer = tmp_path / "train.tar"
    outer.write_bytes(tar_bytes({"n01.tar": buffer.getvalue(), "n02.tar": linked.getvalue()}))
    cfg = config(str(outer), str(tmp_path / "ds"))
    _, groups = prepare.plan(cfg)
    damaged = list(prepare._group_inputs(groups[0], cfg))
    assert [(r[0], r[3]) for r in damaged[:1]] == [("n01/a", jpeg)]
    [(key, _, _, error)] = damaged[1:]
    assert key == "n01/" and "ValueError: invalid literal for int()" in str(error)
    rows = list(prepare._group_inputs(groups[1], cfg))
    assert [(r[0], r[2].rsplit("/", 1)[-1], r[3]) for r in rows[1:]] == [("n02/a", "a.JPEG", jpeg)]
    assert (rows[0][0], str(rows[0][3])) == ("n02/a", tars.NOT_A_FILE)  # the link: an input

    outer.write_bytes(tar_bytes({"a/n01.tar": linked.getvalue(), "b/n01.tar": linked.getvalue()}))
    with pytest.raises(ValueError, match=r"class tars of one name in other folders: \['a/n01"):
        prepare.plan(cfg)


def test_a_source_whose_files_refuse_to_be_read_fails_before_any_work(
    tmp_path, monkeypatch
) -> None:
    """Credentials that list SRC but may not read its files would make every file a final
    error row; a file refused among others that read stays an error row of its own."""
    write_image_tree(tmp_path / "src", classes=1, per_class=3)
    cfg = config(str(tmp_path / "src"), str(tmp_path / "ds"))
    real, tried = storage.read_range, []

    def refused(url, start, size, s3=None):
        tried.append(url)
        if not url.endswith(allowed):
            raise PermissionError(13, "Access Denied")
        return real(url, start, size, s3)

    monkeypatch.setattr(storage, "read_range", refused)
    allowed = "none"
    with pytest.raises(PermissionError, match=r"the first 3 files to convert refuse to be read"):
        prepare.main(cfg)
    assert len(tried) == 3 and not (tmp_path / "ds").exists()
    tried.clear()
    allowed = "img1.jpg"  # the second file reads: the groups go on to their own errors
    _, groups = prepare.plan(cfg)
    prepare._check_readable(groups, cfg)
    assert len(tried) == 2


def test_flat_folder_with_label_file(tmp_path, ray_session) -> None:
    flat = tmp_path / "val"
    flat.mkdir()
    lines = []
    for i, photo in enumerate(("astronaut", "chelsea", "coffee")):
        (flat / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(encode(photo_rgb(photo, size=70)))
        lines.append(f"ILSVRC2012_val_{i:08d}.JPEG {i * 2}")
    lines.append("/ILSVRC2012_val_00000009.JPEG 1")  # listed, missing on disk
    (flat / "unlisted.JPEG").write_bytes(encode(photo_rgb("rocket", size=40)))
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(lines) + "\n")
    manifest = prepare.main(config(str(flat), str(tmp_path / "ds"), labels_file=str(labels)))
    assert manifest.classes == tuple(str(i) for i in range(5))
    assert (manifest.num_inputs, manifest.num_rows, manifest.num_errors) == (4, 3, 1)
    rows = read_rows(str(tmp_path / "ds"), manifest)
    assert sorted((r["key"], r["label"]) for r in rows) == [
        ("0/ILSVRC2012_val_00000000", 0),
        ("2/ILSVRC2012_val_00000001", 2),
        ("4/ILSVRC2012_val_00000002", 4),
    ]


def test_a_task_asks_for_the_memory_its_largest_group_needs() -> None:
    """A class tar is held whole, files a read window at a time; a shard's rows are held
    three times over when written; one image at the pixel limit, converted (JPEGs, by
    their names, decode at a reduced scale); the interpreter."""
    cfg = config("/src", "/dst", shard_mb=64, max_pixels=1_000_000)
    fixed = 3 * 64 * 2**20 + prepare.TASK_BASE_BYTES
    jpeg, other = 1 * 1_000_000, 13 * 1_000_000
    tar = {"kind": "tar", "size": 300 * 2**20}
    big = 200 * 2**20
    files = {
        "kind": "files",
        "items": [{"url": "a.JPG", "size": big}, {"url": "b.jpeg", "size": big}],
    }
    pngs = {"kind": "files", "items": [{"url": "a.jpg", "size": 1}, {"url": "b.png", "size": 1}]}
    assert prepare.task_memory([tar], cfg) == 300 * 2**20 + fixed + jpeg
    assert prepare.task_memory([files], cfg) == storage.READ_EACH_MAX_BYTES + fixed + jpeg
    assert prepare.task_memory([tar, files], cfg) == 300 * 2**20 + fixed + jpeg
    assert prepare.task_memory([tar, pngs], cfg) == 300 * 2**20 + fixed + other
    assert prepare.task_memory([], cfg) == fixed


def test_a_small_jpeg_is_kept_as_it_is_only_when_nothing_follows_its_end() -> None:
    """A phone's trailer after the end marker (Samsung's SEFH block, say) is refused by
    nvJPEG, the training loader's decoder on GPUs: such a JPEG is encoded again. Zeros
    after the end (disk recovery's padding) are left out of the kept bytes."""
    from jobs.images import whole_jpeg

    cfg = config("/src", "/dst")
    small = encode(photo_rgb("coffee")[:60, :48])  # short side below 64: kept
    assert prepare.convert(small, cfg)[0] == small
    assert prepare.convert(small + bytes(5000), cfg)[0] == small
    trailed = small + b"\0\0SEFHtrailer" + bytes(8)
    jpeg, height, width, _ = prepare.convert(trailed, cfg)
    assert jpeg != trailed and whole_jpeg(jpeg) and (height, width) == (60, 48)


def test_a_group_done_again_removes_the_parts_an_earlier_attempt_wrote_beyond_its_own(
    tmp_path,
) -> None:
    """An attempt killed after writing more parts than the one that finishes (an input that
    read then fails now) leaves none of them: the shards are the markers' parts only."""
    (tmp_path / "src" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "cat" / "a.png").write_bytes(encode(photo_rgb("coffee")[:50, :70], "PNG"))
    cfg = config(str(tmp_path / "src"), str(tmp_path / "ds"))
    _, groups = prepare.plan(cfg)
    left = [storage.join(cfg.dst, prepare._part_name(0, n)) for n in (1, 2)]
    for url in left:
        storage.write_bytes(url, b"an earlier attempt's part")
    marker = prepare.process_group(0, groups[0], cfg)
    assert [part["name"] for part in marker["parts"]] == [prepare._part_name(0, 0)]
    assert not any(storage.exists(url) for url in left)


def test_running_out_of_memory_is_said_to_be_in_the_error_row(tmp_path, monkeypatch) -> None:
    """A MemoryError while converting an input is recorded as the machine's state, not as a
    bad image: the group is done all the same (failed, it would fail on every re-run where
    the input always runs out)."""
    (tmp_path / "src" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "cat" / "a.png").write_bytes(encode(photo_rgb("coffee")[:50, :70], "PNG"))
    cfg = config(str(tmp_path / "src"), str(tmp_path / "ds"))
    _, groups = prepare.plan(cfg)

    def out_of_memory(data, cfg):
        raise MemoryError("no room")

    monkeypatch.setattr(prepare, "convert", out_of_memory)
    [error] = prepare.process_group(0, groups[0], cfg)["errors"]
    assert error["reason"] == "ran out of memory converting it (MemoryError: no room)"
    assert storage.exists(prepare._marker_url(cfg, 0))


def test_a_source_spelled_s3a_plans_as_the_same(s3_server) -> None:
    """s3a:// and s3:// name one bucket: a re-run spelling SRC the other way resumes."""
    for name in ("n01/a.jpg", "n01/b.jpg", "n02/c.jpg"):
        storage.write_bytes(s3_server.url("spelled", name), encode(photo_rgb("coffee", 32)))
    src = s3_server.url("spelled")
    plans = [prepare.plan(config(url, s3_server.url("out"))) for url in (src, "s3a" + src[2:])]
    (classes, groups), (classes_a, groups_a) = plans
    assert groups_a[0]["items"][0]["url"].startswith("s3a://")  # read as spelled
    assert prepare._plan_digest(classes, groups) == prepare._plan_digest(classes_a, groups_a)
    fewer = [{**groups[0], "items": groups[0]["items"][:2]}, *groups[1:]]
    assert prepare._plan_digest(classes, groups) != prepare._plan_digest(classes, fewer)


def test_bad_configs_fail_before_any_work(tmp_path) -> None:
    with pytest.raises(ValueError, match="SRC and DST are required"):
        prepare.PrepareConfig(src=str(tmp_path))
    for dst in (str(tmp_path) + "/", str(tmp_path / "out"), str(tmp_path) + "/x/../out"):
        with pytest.raises(ValueError, match="DST must not be SRC or inside it"):
            prepare.PrepareConfig(src=str(tmp_path), dst=dst)
    with pytest.raises(ValueError, match="DST must not be SRC or inside it"):  # the root's
        prepare.PrepareConfig(src="/", dst=str(tmp_path / "out"))
    for problem in (["shard_mb", "nan"], ["max_file_mb", "inf"], ["cpus_per_task", "1e-9"]):
        name, value = problem
        with pytest.raises(ValueError, match=f"{name} must be finite and "):
            prepare.PrepareConfig(src=str(tmp_path), dst=str(tmp_path) + "-out",
                                  **{name: float(value)})  # fmt: skip
    for src in ("nope", "nope.tar"):  # a folder, and an ILSVRC tar of tars
        with pytest.raises(ValueError, match=r"SRC .*nope(\.tar)?: no such file or folder"):
            prepare.plan(config(str(tmp_path / src), str(tmp_path) + "-out"))
    absent = str(tmp_path / "labels.txt")
    with pytest.raises(ValueError, match=r"--labels-file .*labels.txt: no such file"):
        prepare.plan(config(str(tmp_path), str(tmp_path) + "-out", labels_file=absent))
    with pytest.raises(ValueError, match="no files in it"):
        prepare.plan(config(str(tmp_path), str(tmp_path) + "-out"))
    hidden = (".DS_Store", ".ipynb_checkpoints/a-checkpoint.jpg", "n01/.DS_Store")
    for name in hidden:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(ValueError, match="no files in it"):  # hidden ones are left out
        prepare.plan(config(str(tmp_path), str(tmp_path) + "-out"))
    (tmp_path / "n02").mkdir()
    (tmp_path / "n02" / "a.jpg").write_bytes(b"x")
    classes, [group] = prepare.plan(config(str(tmp_path), str(tmp_path) + "-out"))
    assert classes == ["n02"] and [i["key"] for i in group["items"]] == ["n02/a"]
    for name in (*hidden, "n02/a.jpg"):
        (tmp_path / name).unlink()
    (tmp_path / "loose.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="not inside a class folder"):
        prepare.plan(config(str(tmp_path), str(tmp_path) + "-out"))
    labels = tmp_path.parent / f"{tmp_path.name}-labels.txt"
    bad_lines = {
        "loose.jpg -1": "labels.txt:2: expected '<path> <label >= 0>'",
        "sub/../../secret.jpg 1": "'sub/../../secret.jpg' is outside SRC",
    }
    for line, message in bad_lines.items():
        labels.write_text(f"./loose.jpg 0\n{line}\n")
        with pytest.raises(ValueError, match=re.escape(message)):
            prepare.plan(config(str(tmp_path), str(tmp_path) + "-out", labels_file=str(labels)))
    labels.write_text("./loose.jpg 0\nloose.jpg 1\n")
    with pytest.raises(ValueError, match=re.escape("labels.txt:2: 'loose.jpg' is listed twice")):
        prepare.plan(config(str(tmp_path), str(tmp_path) + "-out", labels_file=str(labels)))
    labels.write_text("val/loose.jpg 0\nval/other.jpg 1\n")  # paths not relative to SRC
    with pytest.raises(ValueError, match=r"none of the 2 images .* lists is in SRC .*'loose.jpg'"):
        prepare.plan(config(str(tmp_path), str(tmp_path) + "-out", labels_file=str(labels)))
    with pytest.raises(ValueError, match="is a file: with --labels-file it must be the folder"):
        src = str(tmp_path / "loose.jpg")  # an archive of the images, say
        prepare.plan(config(src, str(tmp_path) + "-out", labels_file=str(labels)))
    labels.write_text("./loose.jpg 0\n")  # the listed spelling need not be the stored one
    [group] = prepare.plan(config(str(tmp_path), str(tmp_path) + "-out", labels_file=str(labels)))[
        1
    ]
    assert [(i["key"], i["size"]) for i in group["items"]] == [("0/loose", 1)]
    (tmp_path / "a scan.jpg").write_bytes(b"xy")  # a path with a space
    labels.write_text("./loose.jpg 0\n  a scan.jpg   3 \n")
    [group] = prepare.plan(config(str(tmp_path), str(tmp_path) + "-out", labels_file=str(labels)))[
        1
    ]
    keys = sorted((i["key"], i["size"]) for i in group["items"])
    assert keys == [("0/loose", 1), ("3/a scan", 2)]
    for folder in ("a", "b.v2"):  # one name in two folders, with one label: two images
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.jpg").write_bytes(b"xyz")
    labels.write_text("a/x.jpg 1\nb.v2/x.jpg 1\nb.v2/../loose.jpg 1\n")
    [group] = prepare.plan(config(str(tmp_path), str(tmp_path) + "-out", labels_file=str(labels)))[
        1
    ]
    assert sorted(i["key"] for i in group["items"]) == ["1/a/x", "1/b.v2/x", "1/loose"]


def test_the_conversion_tasks_do_not_load_torch() -> None:
    """`jobs.prepare` imported and its conversion run in a fresh interpreter leave torch
    unloaded: a conversion worker spares its import (about a second) and its memory."""
    code = (
        "import io, sys\n"
        "from PIL import Image\n"
        "import jobs.prepare as prepare\n"
        "cfg = prepare.PrepareConfig(src='/in', dst='/out')\n"
        "for fmt in ('JPEG', 'PNG'):  # converted as a task does: decoded, resized, encoded\n"
        "    buffer = io.BytesIO()\n"
        "    Image.new('RGB', (400, 300), (200, 90, 30)).save(buffer, fmt)\n"
        "    prepare.convert(buffer.getvalue(), cfg)\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr
