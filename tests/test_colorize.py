"""Batch colorization: planted corpora on S3 through Ray Data, accounting, resume, metadata,
16-bit and alpha, both model formats, and bf16 and int8 against fp32."""

from __future__ import annotations

import copy
import dataclasses
import gzip
import io
import json
import math
import os
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from collections import Counter

import imagecodecs
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageCms, ImageOps

import colorcore.int8
from colorcore.color import rgb_to_lab, rgb_to_lightness
from colorcore.decode import colorize as reference_colorize
from colorcore.model import ColorizationNet, ModelConfig
from jobs import colorize, colorize_manifest, picture_files, storage, tars
from jobs.config import run_cli
from jobs.runtime import Precision
from tests.support import ROOT, encode, photo_rgb, tar_bytes
from tests.test_icc import input_only

INFER_PX = 64  # small network input: the tests check plumbing, not colour quality
SRGB_ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
GRAY_18 = imagecodecs.cms_profile("gray", gamma=1.8)  # gray far from sRGB's curve
ADOBE_RGB = imagecodecs.cms_profile("adobergb")
XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description tiff:Orientation="6">'
       b"archive-42</rdf:Description></rdf:RDF></x:xmpmeta>")  # fmt: skip
IPTC = b"\x1c\x02\x05\x00\x0bScan no. 42"


def gray(size: tuple[int, int], name: str = "coffee") -> np.ndarray:
    """A real photo as 8-bit grayscale (H, W), the kind of scan the job is for."""
    h, w = size
    photo = Image.fromarray(photo_rgb(name)).convert("L")
    return np.asarray(photo.resize((w, h), Image.Resampling.BICUBIC))


def save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def jpeg_with_metadata() -> bytes:
    """40 x 24 stored, EXIF orientation 6 (shown rotated: 24 x 40), ICC, XMP, IPTC, EXIF tags."""
    exif = Image.Exif()
    exif[0x0112], exif[0x013B] = 6, "A. Archivist"  # Orientation, Artist
    exif.get_ifd(0x8769)[0x9003] = "1931:05:01 12:00:00"  # DateTimeOriginal
    image = Image.fromarray(gray((24, 40))).convert("RGB")
    return save(image, "JPEG", exif=exif.tobytes(), icc_profile=SRGB_ICC, xmp=XMP,
                extra=picture_files.iptc_segment(IPTC), quality=95)  # fmt: skip


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def parquet_bytes(rows: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    table = pa.table({"path": list(rows), "image": pa.array(list(rows.values()), pa.binary())})
    pq.write_table(table, buffer)
    return buffer.getvalue()


def planted_corpus() -> tuple[dict[str, bytes], dict[str, str], dict[str, str]]:
    """(files under INPUT, expected output path by source suffix, expected reason by source)."""
    rgba = np.dstack([np.repeat(gray((20, 30))[..., None], 3, 2), np.arange(600).reshape(20, 30)])
    palette = Image.fromarray(gray((16, 16))).convert("P", palette=Image.Palette.ADAPTIVE)
    pages = [Image.fromarray(gray((12 + 4 * i, 20), "astronaut")) for i in range(3)]
    gray16 = gray((18, 22)).astype(np.uint16) * 257 + np.arange(22, dtype=np.uint16)[None]
    good_jpeg = encode(gray((32, 32)))
    stored = encode(gray((7, 7), "coffee"), "PNG")  # zip stores it as is: its CRC is broken
    truncated = encode(gray((64, 64)))
    files = {
        "meta.jpg": jpeg_with_metadata(),
        "rgba.png": encode(rgba.astype(np.uint8), "PNG"),
        "palette.png": save(palette, "PNG"),
        "cmyk.jpg": save(Image.fromarray(gray((20, 20))).convert("CMYK"), "JPEG"),
        "gray16.png": save(Image.fromarray(gray16), "PNG"),
        "one.png": encode(np.full((1, 1), 77, np.uint8), "PNG"),
        "pages.tif": save(pages[0], "TIFF", save_all=True, append_images=pages[1:]),
        "photo.webp": encode(gray((24, 24)), "WEBP", quality=90),
        "old.gif": save(Image.fromarray(gray((10, 14))), "GIF"),
        "sub/deep/x.jpg": good_jpeg,
        "empty.jpg": b"",
        "truncated.jpg": truncated[: len(truncated) // 2],
        "notes.txt": b"not an image at all",
        "huge.png": encode(np.zeros((500, 700), np.uint8), "PNG"),
        "broken.tar": b"this is not a tar archive" * 40,
        "box.tar": tar_bytes(
            {"a/b.jpg": good_jpeg, "../escape.jpg": good_jpeg, "/abs.jpg": good_jpeg,
             "bad.jpg": b"garbage", "./a/b.jpg": good_jpeg},
            symlink="link.jpg",
        ),
        "box.zip": zip_bytes({"z/ok.png": encode(gray((9, 9)), "PNG"),
                              "../../zipescape.png": good_jpeg, "_colorize/x.jpg": good_jpeg,
                              "z/crc.png": stored}).replace(stored, stored[:-8] + bytes(8)),
        "_colorize/top.jpg": good_jpeg,
        "table.parquet": parquet_bytes({"r/one.jpg": good_jpeg, "r/two": encode(gray((8, 12))),
                                        "r/bad.jpg": b"\xff\xd8 not really"}),
    }  # fmt: skip
    outputs = {
        "meta.jpg": "meta.jpg", "rgba.png": "rgba.png", "palette.png": "palette.png",
        "cmyk.jpg": "cmyk.jpg", "gray16.png": "gray16.png", "one.png": "one.png",
        "pages.tif": "pages.tif", "photo.webp": "photo.webp", "old.gif": "old.gif.png",
        "sub/deep/x.jpg": "sub/deep/x.jpg", "box.tar!a/b.jpg": "box.tar/a/b.jpg",
        "box.zip!z/ok.png": "box.zip/z/ok.png",
        "table.parquet#r/one.jpg": "table.parquet/r/one.jpg",
        "table.parquet#r/two": "table.parquet/r/two.jpg",
    }  # fmt: skip
    reasons = {
        "empty.jpg": "empty file", "truncated.jpg": "truncated", "notes.txt": "not an image",
        "huge.png": "too large", "broken.tar": "unreadable archive",
        "box.tar!../escape.jpg": "escapes the output folder",
        "box.tar!/abs.jpg": "escapes the output folder", "box.tar!bad.jpg": "not an image",
        "box.tar!link.jpg": "not a regular file",
        "box.zip!../../zipescape.png": "escapes the output folder",
        "box.tar!./a/b.jpg": "same output path", "box.zip!_colorize/x.jpg": "job's own folder",
        "box.zip!z/crc.png": "unreadable archive member", "_colorize/top.jpg": "job's own folder",
        "table.parquet#r/bad.jpg": "image",
    }  # fmt: skip
    return files, outputs, reasons


def config(src: str, dst: str, model: str, **kw) -> colorize.ColorizeConfig:
    kw = {"infer_px": INFER_PX, "max_pixels": 300_000, "batch_size": 4, "files_per_task": 4,
          "model_actors": 1, "actor_cpus": 0.5, "task_cpus": 0.25} | kw  # fmt: skip
    return colorize.ColorizeConfig(input=src, output=dst, model=model, **kw)


def by_suffix(rows: list[dict], root: str) -> dict[str, dict]:
    return {r["source"][len(root) + 1 :]: r for r in rows}


def lightness(image: Image.Image) -> torch.Tensor:
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return rgb_to_lab(torch.from_numpy(rgb).permute(2, 0, 1)[None])[0, 0]


def read_png16(data: bytes) -> np.ndarray:
    """The pixels of a 16-bit RGB PNG written by the job (filter type 0 rows)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = {}, 8
    while at < len(data):
        (length,), kind = struct.unpack(">I", data[at : at + 4]), data[at + 4 : at + 8]
        chunks.setdefault(kind, b"")
        chunks[kind] += data[at + 8 : at + 8 + length]
        at += 12 + length
    w, h, depth, color_type = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color_type) == (16, 2)
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + 6 * w)
    assert not rows[:, 0].any()
    return rows[:, 1:].copy().view(">u2").reshape(h, w, 3).astype(np.uint16)


def test_model_actor_count_leaves_ray_data_room_for_the_reads() -> None:
    """One actor per GPU; on CPUs one per core at the default actor_cpus, and never more than
    half the CPUs in Ray's accounting (2 actors of 0.75 CPU on 2 cores stalled the reads)."""
    defaults = colorize.ColorizeConfig(input="in", output="out", model="m")
    assert colorize._model_actors(defaults, gpus=4, cpus=64) == 4
    for cpus in (1, 2, 16, 96):
        actors = colorize._model_actors(defaults, gpus=0, cpus=cpus)
        assert actors == cpus and actors * defaults.actor_cpus <= max(cpus / 2, 0.5)
    wide = dataclasses.replace(defaults, actor_cpus=0.75)
    assert colorize._model_actors(wide, gpus=0, cpus=2) == 1
    assert colorize._model_actors(dataclasses.replace(wide, model_actors=3), 0, 2) == 3
    # a GPU model named: GPU actors, as with device cuda, on a cluster with no GPU node yet
    named = dataclasses.replace(defaults, accelerator_type="L40S", model_actors=6)
    assert colorize._gpus(named, cluster_gpus=0) == 6 and colorize._gpus(defaults, 0) == 0
    assert colorize._gpus(defaults, 4) == 4
    assert colorize._gpus(dataclasses.replace(defaults, dtype="int8"), 4) == 0  # CPU actors


def test_config_is_validated_and_parses(capsys, tmp_path) -> None:
    with pytest.raises(ValueError, match="inside"):
        colorize.ColorizeConfig(input="s3://b/in", output="s3://b/in/out", model="m")
    (tmp_path / "in").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "in")  # OUTPUT inside INPUT, through a link
    with pytest.raises(ValueError, match="inside"):
        colorize.ColorizeConfig(input=str(tmp_path / "in"), output=str(tmp_path / "link" / "out"),
                                model="m")  # fmt: skip
    with pytest.raises(ValueError, match="inside"):
        colorize.ColorizeConfig(input="/data/in/", output="/data/in", model="m")
    colorize.ColorizeConfig(input="/data/in", output="/data/in-colour", model="m")  # a sibling
    for around in ("/data", "/"):  # one image's output would be the image itself
        with pytest.raises(ValueError, match="must be apart"):
            colorize.ColorizeConfig(input="/data/photo.jpg", output=around, model="m")
    with pytest.raises(ValueError, match="required"):
        colorize.ColorizeConfig(input="/a", output="/b")
    with pytest.raises(ValueError, match="temperature"):
        colorize.ColorizeConfig(input="/a", output="/b", model="m", temperature=0)
    bad = [({"temperature": 1e-8}, "temperature must be finite and >= 0.001"),  # NaN colours
           ({"device": "gpu"}, "device must be auto, cpu, cuda or cuda:N"),
           ({"max_file_mb": math.nan}, "max_file_mb must be finite and > 0"),
           ({"archive_part_mb": math.nan}, "archive_part_mb must be finite and > 0"),
           ({"actor_cpus": 1e-9}, "actor_cpus must be finite and >= 0.0001")]  # fmt: skip
    for fields, message in bad:
        with pytest.raises(ValueError, match=message):
            colorize.ColorizeConfig(input="/a", output="/b", model="m", **fields)
    with pytest.raises(ValueError, match="batch_size >= 0"):
        colorize.ColorizeConfig(input="/a", output="/b", model="m", batch_size=-1)
    with pytest.raises(ValueError, match="accelerator_type names a GPU"):
        colorize.ColorizeConfig(input="/a", output="/b", model="m", device="cpu",
                                accelerator_type="L40S", model_actors=2)  # fmt: skip
    with pytest.raises(ValueError, match="accelerator_type needs model_actors"):
        colorize.ColorizeConfig(input="/a", output="/b", model="m", accelerator_type="L40S")
    for gpu_only in ({"device": "cuda"}, {"device": "cuda:1"}, {"jpeg_path": "device"},
                     {"accelerator_type": "L40S", "model_actors": 2}):  # fmt: skip
        with pytest.raises(ValueError, match="int8 runs the model on CPUs"):
            colorize.ColorizeConfig(input="/a", output="/b", model="m", dtype="int8", **gpu_only)
    with pytest.raises(ValueError, match="drop compile"):
        colorize.ColorizeConfig(input="/a", output="/b", model="m", dtype="int8", compile=True)
    with pytest.raises(ValueError, match="int8_max_ab_error"):
        colorize.ColorizeConfig(input="/a", output="/b", model="m", int8_max_ab_error=0)
    with pytest.raises(ValueError, match="encode_threads must be >= 0"):
        colorize.ColorizeConfig(input="/a", output="/b", model="m", encode_threads=-1)
    with pytest.raises(ValueError, match="drop encode_threads or jpeg_path cpu"):
        colorize.ColorizeConfig(input="/a", output="/b", model="m", encode_threads=4,
                                jpeg_path="cpu")  # fmt: skip
    for bad in ({"cpu_encode_pieces": 1.5}, {"cpu_encode_pieces": float("nan")}):
        with pytest.raises(ValueError, match="cpu_encode_pieces must lie in"):
            colorize.ColorizeConfig(input="/a", output="/b", model="m", **bad)
    for bad in ({"encode_threads": 0}, {"jpeg_path": "cpu"}):
        with pytest.raises(ValueError, match="needs encode_threads > 0"):
            colorize.ColorizeConfig(input="/a", output="/b", model="m", cpu_encode_pieces=0.5,
                                    **bad)  # fmt: skip
    argv = ["in", "out", "--model", "m", "--temperature", "0.5", "--format", "png", "--dry-run"]
    run_cli(colorize.ColorizeConfig, colorize.main, argv, positionals=("input", "output"))
    printed = json.loads(capsys.readouterr().out)
    assert (printed["input"], printed["output"], printed["temperature"]) == ("in", "out", 0.5)
    assert printed["format"] == "png"


def test_encode_threads_default_to_the_nodes_cpus_per_gpu_less_one(
    ray_session, monkeypatch
) -> None:
    import ray

    cfg = colorize.ColorizeConfig(input="/a", output="/b", model="m")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert colorize._encode_threads(dataclasses.replace(cfg, encode_threads=3), cuda) == 3
    assert colorize._encode_threads(cfg, cpu) == 0  # CPU actors encode their own
    # in a Ray worker: the node's resources as Ray counts them (this one: 2 CPUs, no GPU)
    assert ray.get(ray.remote(num_cpus=0.1)(colorize._node_resources).remote()) == (2.0, 0.0)
    task = ray.remote(num_cpus=0.1)(colorize._encode_threads)
    assert ray.get(task.remote(cfg, cuda)) == 1
    monkeypatch.setattr(colorize, "_node_resources", lambda: (32.0, 2.0))  # 2 GPUs, 32 CPUs
    assert colorize._encode_threads(cfg, cuda) == 15


def test_cpu_encoder_keeps_each_images_place_and_colour_and_fails_file_by_file() -> None:
    """Images of two sizes (two copies to the host), in RGB: each file decodes to its own
    colour at its own place; an image the encoder refuses (no pixels) fails alone."""
    from jobs.colorize_jpeg import cpu_encoder
    from jobs.images import each_or_none

    colours = [(200, 30, 10), (10, 200, 30), (30, 10, 200)]
    shapes = [(4, 6), (5, 3), (4, 6)]
    images = [torch.tensor(c, dtype=torch.uint8)[:, None, None].expand(3, h, w).contiguous()
              for c, (h, w) in zip(colours, shapes, strict=True)]  # fmt: skip
    encode = cpu_encoder(2)
    assert encode([], 90) == []
    out = encode(images, 90)
    for data, colour, (h, w) in zip(out, colours, shapes, strict=True):
        pixels = np.asarray(Image.open(io.BytesIO(data)))
        assert pixels.shape == (h, w, 3) and np.abs(pixels.astype(int) - colour).max() <= 3
    empty = torch.zeros((3, 0, 6), dtype=torch.uint8)
    got = each_or_none(lambda some: encode(some, 90), [images[0], empty, images[2]])
    assert got == [out[0], None, out[2]]

    def short_of_memory(some: list) -> list:  # as torchvision's nvJPEG reports it
        raise RuntimeError("Error while decoding JPEG images: CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):  # not each file's fault
        each_or_none(short_of_memory, images)


@pytest.mark.parametrize("name", ["../x.jpg", "/etc/x.jpg", "a/../../x.jpg", "..", "C:\\x.jpg",
                                  "a\\..\\..\\x.jpg", "s3://b/x.jpg"])  # fmt: skip
def test_member_paths_that_leave_the_output_folder_are_refused(name: str) -> None:
    with pytest.raises(colorize.BadImage, match=r"escapes|drive or a URL"):
        colorize.safe_relpath(name)
    assert colorize.safe_relpath("a/./b/../c.jpg") == "a/c.jpg"
    assert colorize.safe_relpath("scans/IMG 12:30.jpg") == "scans/IMG 12:30.jpg"


def test_folder_of_files_and_archives_on_s3(ci_run, s3_server, ray_session) -> None:
    cfg_train, _ = ci_run
    model_url = storage.join(cfg_train.storage, cfg_train.name)  # a run folder
    files, outputs, reasons = planted_corpus()
    src, dst = s3_server.url("colorize-in"), s3_server.url("colorize-out")
    for rel, data in files.items():
        storage.write_bytes(storage.join(src, rel), data)
    cfg = config(src, dst, model_url, archive_part_mb=1 / 2**20)  # zip and Parquet split
    parts = Counter(u["url"].rsplit("/", 1)[1] for u in colorize.plan(cfg, [])[0] if "part" in u)
    assert parts == {"box.zip": 4, "table.parquet": 1}  # a part per member, per row group
    summary = colorize.main(cfg)

    rows = by_suffix(summary.table.to_pylist(), src)
    assert set(rows) == set(outputs) | set(reasons)  # every input once, archive members included
    assert summary.inputs == len(rows) == summary.outputs + summary.errors
    assert (summary.outputs, summary.errors) == (len(outputs), len(reasons))
    for source, output in outputs.items():
        assert (rows[source]["status"], rows[source]["output"]) == ("ok", output), rows[source]
    for source, reason in reasons.items():
        assert rows[source]["status"] == "error" and reason in rows[source]["reason"], rows[source]
    listed = sorted(u[len(dst) + 1 :] for u in storage.list_files(dst) if "/_colorize/" not in u)
    assert listed == sorted(outputs.values())  # nothing outside OUTPUT, nothing extra
    manifest = pq.read_table(io.BytesIO(storage.read_bytes(summary.manifest_url))).to_pylist()
    assert sorted(m["source"] for m in manifest) == sorted(r["source"] for r in rows.values())
    assert all(m["model_sha256"] == manifest[0]["model_sha256"] != "" for m in manifest)

    def out(name: str) -> Image.Image:
        return Image.open(io.BytesIO(storage.read_bytes(storage.join(dst, name))))

    def source(name: str) -> Image.Image:
        return Image.open(io.BytesIO(files[name]))

    # Orientation applied and reset; EXIF, ICC, XMP, IPTC carried; provenance written.
    meta = out("meta.jpg")
    assert meta.size == (24, 40) and meta.mode == "RGB"
    exif = meta.getexif()
    assert 0x0112 not in exif and exif[0x013B] == "A. Archivist"
    assert exif.get_ifd(0x8769)[0x9003] == "1931:05:01 12:00:00"
    provenance = exif[picture_files.PROVENANCE_EXIF_TAG]
    assert manifest[0]["model_sha256"] in provenance and "temperature=0.38" in provenance
    assert meta.info["icc_profile"] == SRGB_ICC and b"archive-42" in meta.info["xmp"]
    assert b"Orientation" not in meta.info["xmp"]  # XMP's would turn it again
    assert meta.info["photoshop"][0x0404] == IPTC
    # L kept (chroma gamut mapping): within 8-bit rounding (PNG), plus JPEG's loss (JPEG).
    upright = source("meta.jpg").transpose(Image.Transpose.ROTATE_270)
    jpeg_error = (lightness(meta) - lightness(upright)).abs()
    assert jpeg_error.max() < 3.0 and jpeg_error.mean() < 0.6
    assert (lightness(out("palette.png")) - lightness(source("palette.png"))).abs().max() < 0.5
    # Alpha kept exactly; sizes kept; pages kept; 1x1 works.
    rgba = out("rgba.png")
    assert rgba.mode == "RGBA" and np.array_equal(
        np.asarray(rgba)[..., 3], np.asarray(source("rgba.png"))[..., 3]
    )
    assert "colorized by colorcore" in rgba.info["Software"]
    assert out("one.png").size == (1, 1) and out("cmyk.jpg").mode == "RGB"
    assert out("photo.webp").format == "WEBP" and out("old.gif.png").format == "PNG"
    tiff = out("pages.tif")
    sizes = [(tiff.seek(i), tiff.size)[1] for i in range(tiff.n_frames)]
    assert sizes == [(20, 12), (20, 16), (20, 20)] and rows["pages.tif"]["pages"] == 3
    # 16-bit grayscale -> 16-bit RGB whose L follows the source's at 16-bit precision.
    pixels16 = read_png16(storage.read_bytes(storage.join(dst, "gray16.png")))
    source16 = np.asarray(source("gray16.png"), np.float32) / 65535
    l_in = rgb_to_lab(torch.from_numpy(source16)[None, None].expand(-1, 3, -1, -1))[0, 0]
    l_out = rgb_to_lab(torch.from_numpy(pixels16.astype(np.float32) / 65535).permute(2, 0, 1))[0]
    assert pixels16.shape == (18, 22, 3) and (l_out - l_in).abs().max() < 0.05
    assert len(np.unique(pixels16[..., 1] & 0xFF)) > 4  # low bytes used: not 8-bit scaled up

    # The same command again: everything is already done, nothing is redone.
    # The batches' parts are compacted into one at the end; a re-run has nothing to change.
    parts = storage.list_files(colorize_manifest.parts_url(dst))
    compacted = pq.read_table(io.BytesIO(storage.read_bytes(parts[0])))
    read = compacted.filter(pc.equal(compacted.column("status"), colorize_manifest.READ))
    assert len(parts) == 1 and compacted.num_rows == summary.inputs + read.num_rows
    sources = summary.table.column("source").to_pylist()
    archives = sorted(re.split("[!#]", s)[0] for s in sources if re.search("[!#]", s))
    assert read.column("source").to_pylist() == sorted(set(archives))  # each read through once
    sizes = {a: len(storage.read_bytes(a)) for a in archives}
    assert read.column("reason").to_pylist() == [
        colorize_manifest.read_through_reason(archives.count(a), sizes[a])
        for a in sorted(set(archives))
    ]
    again = colorize.main(cfg)
    assert again.skipped == len(rows) and again.inputs == summary.inputs
    assert storage.list_files(colorize_manifest.parts_url(dst)) == parts


def test_tar_input_resumes_after_a_partial_run(tmp_path, ray_session) -> None:
    """A run that stopped part-way (some outputs and manifest parts missing) is completed by
    the same command, every member exactly once. (What is left to do is planned before the
    stages are laid out: the split stages' archives are the next test's.)"""
    model = tmp_path / "tiny.pt"
    torch.manual_seed(0)
    from colorcore import weights

    weights.save_checkpoint(str(model), ColorizationNet(ModelConfig(width=1 / 16)))
    members = {f"roll{i % 2}/img{i:02d}.jpg": encode(gray((16 + i, 20))) for i in range(10)}
    members["../../outside.jpg"] = members["roll0/img00.jpg"]
    archive = tmp_path / "roll.tar"
    archive.write_bytes(tar_bytes(members))
    dst = tmp_path / "out"
    cfg = config(str(archive), str(dst), str(model), batch_size=2)
    first = colorize.main(cfg)
    assert (first.outputs, first.errors) == (10, 1)
    assert sorted(o for o in first.table.column("output").to_pylist() if o) == sorted(
        m for m in members if not m.startswith("..")
    )
    assert not (tmp_path / "outside.jpg").exists()
    # Lose the rows of the last batches of a killed run, and one of their outputs.
    (part,) = (dst / colorize_manifest.PARTS_DIR).iterdir()
    table = pq.read_table(part).sort_by("time")
    lost = table.slice(table.num_rows - 5).to_pylist()
    pq.write_table(table.slice(0, table.num_rows - 5), part)
    lost_ok = [r for r in lost if r["status"] == "ok"]
    (dst / lost_ok[0]["output"]).unlink()
    lost_inputs = [r for r in lost if r["status"] in ("ok", "error")]  # not the tar's own row

    second = colorize.main(cfg)
    assert second.skipped == 11 - len(lost_inputs)
    assert second.inputs == 11 and (second.outputs, second.errors) == (10, 1)
    assert second.table.column("source").equals(first.table.column("source"))
    assert (dst / lost_ok[0]["output"]).exists()
    # Once every member has its row, the tar read through is not opened again: no work.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(colorize, "read_unit", None)  # calling it would fail
        third = colorize.main(cfg)
    assert third.skipped == 11 and (third.outputs, third.errors) == (10, 1)


@pytest.mark.parametrize("stages", ["auto", "split"])  # auto: fused here (no GPU)
def test_an_input_that_kills_its_process_is_given_up_and_the_job_ends(
    tmp_path, ray_session, stages
) -> None:
    """Ray tries a task or an actor's call whose process died again, for ever: an input
    whose decoding kills the process (a format the session's workers die on) is recorded as
    an error after crash_tries deaths while it was worked on alone, and its batch's other
    inputs are colorized, an archive's members among them (one refused for its path)."""
    from colorcore import weights
    from tests.crashing_format import MAGIC

    model = tmp_path / "tiny.pt"
    weights.save_checkpoint(str(model), ColorizationNet(ModelConfig(width=1 / 16)))
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.jpg").write_bytes(encode(gray((20, 16 + i))))
    (src / "1-crashes.png").write_bytes(MAGIC + bytes(64))  # batched with 1.jpg
    member = encode(gray((18, 20)))
    (src / "roll.tar").write_bytes(tar_bytes({"r/a.jpg": member, "../out.jpg": member}))
    cfg = config(str(src), str(dst), str(model), batch_size=2, stages=stages, crash_tries=1)
    summary = colorize.main(cfg)
    assert (summary.inputs, summary.outputs, summary.errors) == (6, 4, 2)
    errors = summary.table.filter(pc.equal(summary.table.column("status"), "error")).to_pylist()
    reasons = {row["source"]: row["reason"] for row in errors}
    crashes, escapes = str(src / "1-crashes.png"), str(src / "roll.tar") + "!../out.jpg"
    assert reasons.keys() == {crashes, escapes}
    assert "died each of the 1 times it took this input alone" in reasons[crashes]
    assert "escapes the output folder" in reasons[escapes]
    assert sorted(p.name for p in dst.glob("*.jpg")) == ["0.jpg", "1.jpg", "2.jpg"]
    assert Image.open(dst / "roll.tar" / "r" / "a.jpg").size == (20, 18)
    assert not (tmp_path / "out.jpg").exists()
    assert not list((dst / colorize_manifest.WORK_DIR / "crashes").iterdir())  # records gone


def test_plan_skips_what_is_done_archive_by_archive(tmp_path) -> None:
    """Done members are handed to their own archive's read task only (an archive whose name
    begins another's included); a done file or failed archive is skipped whole."""
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.tar", "a.tar.gz", "b.zip", "c.jpg", "d.jpg", "e.tar"):
        (src / name).write_bytes(b"")
    url = lambda name: str(src / name)  # noqa: E731
    done = [url("a.tar!x/1.jpg"), url("a.tar.gz!2.jpg"), url("a.tar!0.jpg"), url("c.jpg"),
            url("b.zip!x/3.png"), url("e.tar"), url("a.tar.gz") + "2!9.jpg"]  # fmt: skip
    units, top_level, skipped = colorize.plan(config(str(src), str(tmp_path / "o"), "m.pt"), done)
    assert top_level == [url(n) for n in ("a.tar", "a.tar.gz", "b.zip", "c.jpg", "d.jpg", "e.tar")]
    members = {u["url"]: u["done"] for u in units if u["kind"] != "files"}
    assert members == {url("a.tar"): ["0.jpg", "x/1.jpg"], url("a.tar.gz"): ["2.jpg"],
                       url("b.zip"): ["x/3.png"]}  # fmt: skip
    files = [i["source"] for u in units if u["kind"] == "files" for i in u["items"]]
    assert files == [url("d.jpg")] and skipped == 6


def test_a_top_level_key_that_would_leave_output_is_refused(s3_server) -> None:
    """An S3 key may hold ``..`` or ``.``: a top-level input is refused where its output
    would leave OUTPUT, as an archive member is, and written at its plain path otherwise."""
    root = s3_server.url("colorize-escape", "in")
    keys = ("ok.png", "../../evil.png", "a/./b.png", "c.tar/../../../x.tar", "_colorize/m.png",
            "d/b.gif", "d/./b.gif.png", "e\\f.png")  # fmt: skip
    for key in keys:
        storage.write_bytes(f"{root}/{key}", b"")
    units, _, _ = colorize.plan(
        config(root, s3_server.url("colorize-escape", "o"), "m.pt", format="png"), []
    )
    files = {
        i["source"][len(root) + 1 :]: i for u in units if u["kind"] == "files" for i in u["items"]
    }
    assert "escapes the output folder" in files["../../evil.png"]["error"]
    assert "escapes the output folder" in files["c.tar/../../../x.tar"]["error"]  # refused whole
    assert "job's own folder" in files["_colorize/m.png"]["error"]
    assert "error" not in files["ok.png"] and files["a/./b.png"]["rel"] == "a/b.png"
    # b.gif's output, d/b.gif.png, is the other's plain name: refused, not overwritten
    assert "is another input's" in files["d/b.gif"]["error"]
    assert files["e\\f.png"]["rel"] == "e\\f.png"  # a backslash: a character of the name
    assert all(u["kind"] == "files" for u in units)


@pytest.mark.parametrize(
    ("choice", "refused"),
    [
        ("keep", ["a.gif", "c", "d.jpg"]),  # d.jpg: its bytes may be a PNG's
        ("png", ["a.gif", "d.jpg"]),
        ("jpeg", ["a.gif", "c", "d.jpg"]),
    ],
)
def test_inputs_whose_output_name_is_another_inputs_are_refused(tmp_path, choice, refused):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.gif", "a.gif.png", "b.gif", "c", "c.jpg", "d.jpg", "d.jpg.png"):
        (src / name).write_bytes(b"")
    cfg = config(str(src), str(tmp_path / "o"), "m.pt", format=choice)
    units, _, _ = colorize.plan(cfg, [])
    rows = [r for u in units for r in colorize.read_unit({"unit": json.dumps(u)}, cfg)]
    errors = sorted(
        r["rel"] or r["source"].rsplit("/", 1)[1] for r in rows if "is another" in r["reason"]
    )
    assert errors == refused


def test_a_file_added_under_a_done_inputs_output_name_is_refused(tmp_path) -> None:
    """`a.gif` was colorized to `a.gif.png` by an earlier run; a file `a.gif.png` added to
    INPUT since would overwrite that output: it is refused, and `a.gif` stays done."""
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.gif", "a.gif.png", "b.png"):
        (src / name).write_bytes(b"")
    cfg = config(str(src), str(tmp_path / "o"), "m.pt", format="png")
    units, _, skipped = colorize.plan(cfg, [str(src / "a.gif")], written={"a.gif.png"})
    items = {i["rel"]: i for u in units for i in u["items"]}
    assert skipped == 1 and set(items) == {"a.gif.png", "b.png"}
    assert "another input's output, written before" in items["a.gif.png"]["error"]
    assert "error" not in items["b.png"]


def test_archives_unreadable_to_zipfile_or_in_the_jobs_folder_are_error_rows(tmp_path) -> None:
    import tarfile
    import zipfile

    src = tmp_path / "in"
    (src / colorize.WORK_DIR).mkdir(parents=True)
    png = encode(gray((8, 8)), "PNG")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("m.png", png)
    data = bytearray(buffer.getvalue())
    entry = data.rindex(b"PK\x01\x02")  # its central directory entry: needs zip 7.0 to extract
    data[entry + 6 : entry + 8] = (70).to_bytes(2, "little")
    (src / "new.zip").write_bytes(bytes(data))
    with tarfile.open(src / colorize.WORK_DIR / "b.tar", "w") as archive:
        info = tarfile.TarInfo("m.png")
        info.size = len(png)
        archive.addfile(info, io.BytesIO(png))
    cfg = config(str(src), str(tmp_path / "o"), "m.pt")
    units, _, _ = colorize.plan(cfg, [])
    rows = [r for u in units for r in colorize.read_unit({"unit": json.dumps(u)}, cfg)]
    reasons = {r["source"][len(str(src)) + 1 :]: r["reason"] for r in rows}
    assert reasons.keys() == {"new.zip", f"{colorize.WORK_DIR}/b.tar"}  # no member rows
    assert "NotImplementedError: zip file version 7.0" in reasons["new.zip"]
    assert "inside the job's own folder" in reasons[f"{colorize.WORK_DIR}/b.tar"]


def test_a_zip_whose_members_share_their_data_is_an_error_row(tmp_path) -> None:
    """Members whose stored data overlap (a zip bomb of a few megabytes holds terabytes this
    way, each member within the size limit) are not read: the archive is refused whole."""
    png = encode(gray((8, 8)), "PNG")
    data = bytearray(zip_bytes({"a.png": png, "b.png": png}))
    entry = data.rindex(b"PK\x01\x02")  # b.png's central directory entry: its data a.png's
    data[entry + 42 : entry + 46] = (0).to_bytes(4, "little")
    archive = tmp_path / "z.zip"
    archive.write_bytes(bytes(data))
    cfg = config(str(archive), str(tmp_path / "o"), "m.pt")
    unit = {"kind": "zip", "url": str(archive), "prefix": "z.zip", "done": [], "size": 1}
    [row] = colorize.read_unit({"unit": json.dumps(unit)}, cfg)
    assert row["source"] == str(archive) and row["status"] == "error"
    assert "members overlap in the archive (at 'b.png')" in row["reason"]


def read_members(unit: dict, cfg: colorize.ColorizeConfig) -> list[dict]:
    """The rows `read_unit` gives for an archive's members, after checking that it ends with
    the archive's own row saying it was read through, counting them and those done before."""
    *members, last = colorize.read_unit({"unit": json.dumps(unit)}, cfg)
    read = colorize_manifest.read_through_reason(len(members) + len(unit["done"]), unit["size"])
    assert (last["source"], last["status"], last["reason"]) == (
        colorize._source_text(unit["url"]),
        colorize_manifest.READ,
        read,
    )
    return members


def test_archive_members_never_share_an_output_also_across_runs(tmp_path) -> None:
    """Within an archive, `./a.jpg` after `a.jpg` (done by an earlier run too) and `b.gif.png`
    after `b.gif` (whose output it would be) are refused; the first of each pair is kept."""
    data = encode(gray((8, 8)))
    archive = tmp_path / "z.zip"
    archive.write_bytes(zip_bytes({"a.jpg": data, "./a.jpg": data, "b.gif": data,
                                   "b.gif.png": data, "c.png": data}))  # fmt: skip
    cfg = config(str(archive), str(tmp_path / "o"), "m.pt")
    for done in ([], ["a.jpg"]):
        unit = {"kind": "zip", "url": str(archive), "prefix": "z.zip", "done": done, "size": 1}
        rows = {r["source"].split("!")[1]: r for r in read_members(unit, cfg)}
        refused = sorted(k for k, r in rows.items() if r["status"] == "error")
        assert refused == ["./a.jpg", "b.gif.png"], rows
        assert sorted(rows) == sorted(
            {"a.jpg", "./a.jpg", "b.gif", "b.gif.png", "c.png"} - set(done)
        )


def awkward_archive(path, kind: str) -> list[str]:
    """A zip or Parquet file at `path` whose members test the naming: repeated names, `./a`
    beside `a`, an output name another member's (`b.gif` -> `b.gif.png`), a path leaving
    OUTPUT, a folder and a link (zip), a name like a numbered copy; returns the names."""
    names = ["a.jpg", "./a.jpg", "b.gif", "b.gif.png", "d/", "a.jpg", "../x.jpg", "c.png",
             "e.jpg", "link.jpg", "f.jpg", "a.jpg (copy 1)", "g.jpg", "a.jpg"]  # fmt: skip
    data = [encode(gray((8, 8 + i))) for i in range(len(names))]
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            for name, member in zip(names, data, strict=True):
                info = zipfile.ZipInfo(name)
                if name == "link.jpg":
                    info.external_attr = (stat.S_IFLNK | 0o777) << 16
                archive.writestr(info, b"" if name.endswith("/") else member)
        return names
    table = pa.table({"image": pa.array(data, pa.binary())})
    if kind == "parquet":
        table = table.append_column("path", pa.array(names))
    pq.write_table(table, path, row_group_size=3)
    return names if kind == "parquet" else [f"{n:09d}" for n in range(len(names))]


@pytest.mark.parametrize("kind", ["zip", "parquet", "parquet-numbered"])
def test_a_large_archive_is_read_in_parts_as_it_is_read_whole(tmp_path, kind) -> None:
    """A zip or Parquet file above archive_part_mb is read by several tasks, split at members
    (Parquet: row groups), each given only what the plan decided differently from a plain
    name: their rows, in order, are the rows of one task reading it whole, members done by an
    earlier run left out, and only a whole archive's task gives its read-through row."""
    suffix = "zip" if kind == "zip" else "parquet"
    path = tmp_path / f"box.{suffix}"
    names = awkward_archive(path, kind)
    sep = colorize.MEMBER_SEP if kind == "zip" else colorize.ROW_SEP
    done = [str(path) + sep + names[7], str(path) + sep + names[2]]  # c.png and b.gif
    whole = config(str(path), str(tmp_path / "o"), "m.pt")
    split = dataclasses.replace(whole, archive_part_mb=1 / 2**20)  # a part per member or group
    units, _, skipped = colorize.plan(whole, done)
    parts, _, _ = colorize.plan(split, done)
    assert len(units) == 1 and "part" not in units[0] and skipped == 2
    # zip: a part per member, but the two done and the folder (in its next member's part)
    groups = {"zip": len(names) - 3, "parquet": 5, "parquet-numbered": 5}[kind]
    assert len(parts) == groups and all("part" in p and p["done"] == [] for p in parts)
    one_task = [r for u in units for r in colorize.read_unit({"unit": json.dumps(u)}, whole)]
    assert one_task.pop()["status"] == colorize_manifest.READ
    tasks = [r for u in parts for r in colorize.read_unit({"unit": json.dumps(u)}, split)]
    assert tasks == one_task
    with open(path, "rb") as f:  # parts of two blocks (members, row groups) each
        _, blocks, _ = colorize._archive_index(kind.split("-")[0], f, split)
    pairs = dataclasses.replace(whole, archive_part_mb=(blocks[0][1] + blocks[1][1]) / 2**20)
    wider, _, _ = colorize.plan(pairs, done)
    spans = [p["part"]["stop"] - p["part"]["start"] for p in wider]
    if kind == "zip":
        assert max(spans) > 2
    else:
        assert spans[:2] == [6, 6]
    assert [r for u in wider for r in colorize.read_unit({"unit": json.dumps(u)}, pairs)] == tasks
    assert len(tasks) == len(names) - 2 - (kind == "zip")  # the folder has no row
    sources = [r["source"][len(str(path)) + 1 :] for r in tasks]
    assert len(set(sources)) == len(sources)
    reasons = Counter(r["reason"].split(":")[0].split(" '")[0] for r in tasks if r["reason"])
    if kind == "parquet-numbered":
        assert not reasons and not any(p["part"]["named"] for p in parts)
        return
    assert {"a.jpg", "a.jpg (copy 2)", "a.jpg (copy 3)", "a.jpg (copy 1)"} <= set(sources)
    assert reasons["an earlier member has the same output path"] == 3  # ./a.jpg, the copies
    # b.gif.png is the output name of b.gif, done by an earlier run
    assert reasons["an earlier member's output is named"] == 1
    assert reasons["path escapes the output folder"] == 1
    assert reasons["archive member is not a regular file (link)"] == (kind == "zip")
    # The parts name only the refused members (the copies among them): the rest are plain.
    assert len([n for p in parts for n in p["part"]["named"]]) == sum(reasons.values())


def test_a_parquet_file_splits_into_fewer_parts_the_larger_its_keys(tmp_path, monkeypatch) -> None:
    """Each part of a split Parquet file reads its key column whole, to check the names: the
    parts are as many as re-reading that column allows (`INDEX_REREADS` of the file), where
    a file of numbered rows, whose parts read only its footer, splits a part a row group."""
    monkeypatch.setattr(colorize, "INDEX_REREADS_FLOOR", 0)
    rng = np.random.default_rng(0)
    images = [encode(rng.integers(0, 256, (64, 64), np.uint8)) for _ in range(40)]  # 5 KB
    keys = [rng.bytes(600).hex() for _ in images]  # 1.2 KB names that hardly compress
    counts = {}
    for named in (True, False):
        path = tmp_path / f"named{named}.parquet"
        columns = {"image": pa.array(images, pa.binary())} | ({"path": keys} if named else {})
        pq.write_table(pa.table(columns), path, row_group_size=4, write_statistics=False)
        cfg = config(str(path), str(tmp_path / "o"), "m.pt", archive_part_mb=1 / 2**20)
        parts, _, _ = colorize.plan(cfg, [])
        counts[named] = len(parts)
    assert counts[True] == 1 and counts[False] >= 5, counts


def test_a_parquet_file_of_image_structs_splits_by_their_bytes(tmp_path) -> None:
    """Hugging Face's Image column (structs of bytes and path) is split a row group a part
    as a binary column is: its bytes are the struct's leaf `image.bytes`."""
    rng = np.random.default_rng(1)
    images = [encode(rng.integers(0, 256, (64, 64), np.uint8)) for _ in range(12)]
    column = pa.array([{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(images)])
    path = tmp_path / "hf.parquet"
    pq.write_table(pa.table({"image": column}), path, row_group_size=4)
    cfg = config(str(path), str(tmp_path / "o"), "m.pt", archive_part_mb=1 / 2**20)
    parts, _, _ = colorize.plan(cfg, [])
    assert [(p["part"]["start"], p["part"]["stop"]) for p in parts] == [(0, 4), (4, 8), (8, 12)]
    assert all(p["part"]["bytes"] > 4 * 2000 for p in parts)


def test_a_split_archive_changed_since_the_plan_or_unreadable(tmp_path) -> None:
    """A part of an archive that has since changed records the archive as unreadable, with
    the members it was to read: another count of members, another size, other names (at the
    same size, anywhere in the archive: a member's name depends on those before it), row
    groups cut elsewhere. An archive whose index does not read is not split, and its one
    task records why."""
    path = tmp_path / "box.zip"
    awkward_archive(path, "zip")
    cfg = config(str(path), str(tmp_path / "o"), "m.pt", archive_part_mb=1 / 2**20)

    def refusal(part: dict) -> str:
        (row,) = colorize.read_unit({"unit": json.dumps(part)}, cfg)
        assert (row["status"], row["source"]) == ("error", part["url"])
        return row["reason"]

    parts, _, _ = colorize.plan(cfg, [])
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("later.jpg", encode(gray((8, 8))))
    reason = refusal(parts[3])
    assert "after 0 members (reading its members 3 to 3)" in reason
    assert "15 members now, 14 when split" in reason
    data = encode(gray((8, 8)))
    path.write_bytes(zip_bytes({"x.jpg": data, "y.jpg": data, "z.jpg": data}))
    parts, _, _ = colorize.plan(cfg, [])
    path.write_bytes(zip_bytes({"y.jpg": data, "x.jpg": data, "z.jpg": data}))  # same size
    assert all("other member names" in refusal(part) for part in parts)  # z.jpg's too
    path.write_bytes(b"no zip at all, " * 20)
    (unit,), _, _ = colorize.plan(cfg, [])
    assert "part" not in unit
    (row,) = colorize.read_unit({"unit": json.dumps(unit)}, cfg)
    assert row["status"] == "error" and "unreadable archive after 0 members" in row["reason"]

    table = tmp_path / "rows.parquet"
    awkward_archive(table, "parquet-numbered")  # row groups of 3
    cfg = dataclasses.replace(cfg, input=str(table))
    parts, _, _ = colorize.plan(cfg, [])
    rows = pq.read_table(table)
    pq.write_table(rows, table, row_group_size=4)
    assert "has changed since the job started" in refusal(parts[1])
    with pytest.raises(ValueError, match="row groups have changed"):  # were it the same size
        colorize._row_groups(pq.ParquetFile(table), range(3, 6))
    pq.write_table(rows.slice(0, 13), table, row_group_size=3)
    assert "13 members now, 14 when split" in refusal(parts[1])
    keyed = tmp_path / "keyed.parquet"
    names = awkward_archive(keyed, "parquet")
    cfg = dataclasses.replace(cfg, input=str(keyed))
    parts, _, _ = colorize.plan(cfg, [])
    rows = pq.read_table(keyed)
    renamed = [names[1], names[0], *names[2:]]  # same names, two swapped: the same size
    pq.write_table(rows.set_column(1, "path", pa.array(renamed)), keyed, row_group_size=3)
    assert keyed.stat().st_size == next(p["size"] for p in parts)
    assert "other member names" in refusal(parts[-1])


@pytest.mark.parametrize("kind", ["zip", "parquet"])
def test_a_split_archive_read_through_is_skipped_unopened_by_a_re_run(tmp_path, kind) -> None:
    """Once every part has read to its end, the driver writes the archive's READ row, with
    the count a task reading it whole gives (rows of its members, and done rows under its
    name, one of a member since gone among them): a re-run skips it unopened, unless a
    member's row is missing."""
    path = tmp_path / f"box.{kind}"
    names = awkward_archive(path, kind)
    out = tmp_path / "o"
    cfg = config(str(path), str(out), "m.pt", archive_part_mb=1 / 2**20)
    sep = colorize.MEMBER_SEP if kind == "zip" else colorize.ROW_SEP
    gone = [str(path) + sep + "gone.jpg"]
    parts, _, _ = colorize.plan(cfg, gone)
    rows = [r for u in parts for r in colorize.read_unit({"unit": json.dumps(u)}, cfg)]
    assert len(rows) == len(names) - (kind == "zip")  # the zip's folder has no row
    colorize._read_through(parts, cfg, colorize._provenance("0" * 64, cfg))
    read = colorize_manifest.archives_read(colorize_manifest.compact(str(out), None))
    assert read == {str(path): (len(rows) + 1, path.stat().st_size)}
    done = gone + [r["source"] for r in rows]
    units, _, skipped = colorize.plan(cfg, done, read)
    assert units == [] and skipped == len(rows) + 1
    assert colorize.plan(cfg, done[:-1], read)[0]  # a member's row missing: opened again


def test_a_split_archive_keeps_its_error_row_until_every_part_reads_through(
    tmp_path, ray_session
) -> None:
    """On Ray: a part that breaks off gives the archive an error row and no READ row; a later
    run whose parts all read through (here the broken one alone, as a re-run retrying
    errors would read what is left) clears it with the READ row."""
    from colorcore import weights

    model = tmp_path / "tiny.pt"
    weights.save_checkpoint(str(model), ColorizationNet(ModelConfig(width=1 / 16)))
    path, out = tmp_path / "box.zip", tmp_path / "o"
    awkward_archive(path, "zip")
    cfg = config(str(path), str(out), str(model), archive_part_mb=1 / 2**20)
    parts, _, _ = colorize.plan(cfg, [])
    provenance = colorize._provenance("0" * 64, cfg)
    broken = copy.deepcopy(parts)
    broken[2]["part"]["digest"] ^= 1
    colorize._run_on_ray(broken, cfg, provenance)
    rows = {r["source"]: r for r in colorize_manifest.compact(str(out), None).to_pylist()}
    assert (
        rows[str(path)]["status"] == "error" and "other member names" in rows[str(path)]["reason"]
    )
    assert sum(source.startswith(str(path) + "!") for source in rows) == len(parts) - 1
    colorize._run_on_ray(parts[2:3], cfg, provenance)
    rows = {r["source"]: r for r in colorize_manifest.compact(str(out), None).to_pylist()}
    assert rows[str(path)]["status"] == colorize_manifest.READ
    assert sum(source.startswith(str(path) + "!") for source in rows) == len(parts)


@pytest.mark.parametrize("suffix", ["tar", "tar.gz"])
def test_a_tar_damaged_in_a_later_header_records_the_archive(tmp_path, suffix) -> None:
    """tarfile stops quietly at a bad header after the first: the members before it are
    read, and the archive gets an error row, so the members lost after it are accounted for."""
    whole = tar_bytes({f"{i}.jpg": encode(gray((8, 8))) for i in range(4)})
    damaged = bytearray(whole)
    damaged[whole.index(b"2.jpg") + 150] ^= 0xFF  # member 2's header no longer parses
    archive = tmp_path / f"t.{suffix}"
    archive.write_bytes(gzip.compress(damaged) if suffix == "tar.gz" else damaged)
    cfg = config(str(archive), str(tmp_path / "o"), "m.pt")
    unit = {"kind": "tar", "url": str(archive), "prefix": archive.name, "done": [], "size": 1}
    rows = list(colorize.read_unit({"unit": json.dumps(unit)}, cfg))
    assert [r["source"].rsplit("!", 1)[-1] for r in rows[:2]] == ["0.jpg", "1.jpg"]
    assert all(r["status"] != "error" for r in rows[:2])
    [last] = rows[2:]
    assert last["source"] == str(archive) and last["status"] == "error"
    assert (
        "unreadable archive after 2 members" in last["reason"]
        and "damaged header" in last["reason"]
    )


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE])
def test_a_tar_declaring_a_huge_extended_header_records_the_archive(tmp_path, kind) -> None:
    """A long name's (or pax) header declaring more than `tars.EXTENDED_HEADER_MAX_BYTES` is
    not read (a few compressed megabytes may declare gigabytes): the members before it are
    read, and the archive gets an error row."""
    jpeg = encode(gray((8, 8)))
    member = tarfile.TarInfo("0.jpg")
    member.size = len(jpeg)
    first = member.tobuf() + jpeg + bytes(-len(jpeg) % tarfile.BLOCKSIZE)
    declared = tars.EXTENDED_HEADER_MAX_BYTES + 1
    header = tarfile.TarInfo("././@LongLink")
    header.type, header.size = kind, declared
    huge = header.tobuf(tarfile.GNU_FORMAT) + bytes(declared + (-declared % tarfile.BLOCKSIZE))
    archive = tmp_path / "t.tar.gz"
    archive.write_bytes(gzip.compress(first + huge + bytes(2 * tarfile.BLOCKSIZE)))
    cfg = config(str(archive), str(tmp_path / "o"), "m.pt")
    unit = {"kind": "tar", "url": str(archive), "prefix": archive.name, "done": [], "size": 1}
    read, last = list(colorize.read_unit({"unit": json.dumps(unit)}, cfg))
    assert read["source"].endswith("!0.jpg") and read["status"] != "error"
    assert last["source"] == str(archive) and last["status"] == "error"
    assert f"an extended header of {declared} bytes" in last["reason"]


@pytest.mark.parametrize("cut", [3, 11])  # in the gzip header, in its FEXTRA field
def test_a_tar_gz_cut_in_its_gzip_header_is_an_error_row(tmp_path, cut) -> None:
    """tarfile's stream reader fails with a TypeError on such a header: an error row all the
    same, not a failed read task."""
    data = b"\x1f\x8b\x08\x04\0\0\0\0\0\x03\x10\0"[:cut]
    archive = tmp_path / "t.tar.gz"
    archive.write_bytes(data)
    cfg = config(str(archive), str(tmp_path / "o"), "m.pt")
    unit = {"kind": "tar", "url": str(archive), "prefix": archive.name, "done": [], "size": cut}
    [row] = colorize.read_unit({"unit": json.dumps(unit)}, cfg)
    assert row["source"] == str(archive) and row["status"] == "error"
    assert "unreadable archive" in row["reason"]


def test_members_done_before_are_decided_again_as_they_were() -> None:
    """A resumed archive's done members take the output paths they took: a refused one (a
    link) none, so that the regular member of its name is written as in the first run, not
    refused; a written one its own, so that a later clash is refused as it was."""
    link, members = tars.NOT_A_FILE, [("a.png", tars.NOT_A_FILE), ("a.png", "file"),
                                      ("b.gif", "file"), ("b.gif.png", "file")]  # fmt: skip

    def decisions(done: list[str]) -> list:
        names = colorize._Names({"prefix": "x.tar", "done": done}, "png")
        return [names.decide("x.tar!", name, kind) for name, kind in members]

    first = decisions([])
    assert first[0] == ("x.tar!a.png", "", link)
    assert first[1] == ("x.tar!a.png (copy 2)", "x.tar/a.png", "")
    assert "an earlier member's output is named" in first[3][2]  # b.gif's: b.gif.png
    again = decisions(["a.png"])  # killed after the link
    assert again[0] is None and again[1:] == first[1:]
    again = decisions(["a.png", "a.png (copy 2)", "b.gif"])  # killed after b.gif
    assert again[:3] == [None] * 3 and again[3] == first[3]


def test_parquet_rows_of_null_names_and_hugging_face_image_structs(tmp_path) -> None:
    """A row whose key is null is named by its number, as rows without a key column are;
    an image column of structs {bytes, path} (Hugging Face's Image feature) is read."""
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    jpegs = [encode(gray((8, 8 + i))) for i in range(3)]
    table = pa.table({
        "image": pa.array([{"bytes": j, "path": None} for j in jpegs], image),
        "path": pa.array([None, None, "a.jpg"], pa.string()),
    })  # fmt: skip
    archive = tmp_path / "hf.parquet"
    pq.write_table(table, archive)
    cfg = config(str(archive), str(tmp_path / "o"), "m.pt")
    unit = {"kind": "parquet", "url": str(archive), "prefix": archive.name, "done": [], "size": 1}
    rows = list(colorize.read_unit({"unit": json.dumps(unit)}, cfg))
    names = [r["source"].rsplit(colorize.ROW_SEP, 1)[-1] for r in rows if r["status"] != "read"]
    assert names == ["000000000", "000000001", "a.jpg"]
    assert all(r["status"] != "error" for r in rows) and [r["data"] for r in rows[:3]] == jpegs
    pq.write_table(pa.table({"n": [1, 2]}), archive)  # no column of bytes: said so
    unit["size"] = archive.stat().st_size
    [row] = colorize.read_unit({"unit": json.dumps(unit)}, cfg)
    assert row["status"] == "error" and "no column of image bytes" in row["reason"]


def test_parquet_rows_are_decompressed_in_bounded_batches_and_huge_ones_not_at_all(
    tmp_path, monkeypatch
) -> None:
    """A few compressed kilobytes may declare gigabytes of rows: rows are read in batches of
    about `PARQUET_BATCH_BYTES` as the file declares them, a row group of one row above the
    size limit is refused unread, and a key column of names longer than any path is
    refused whole."""
    import pyarrow as pa

    jpeg = encode(gray((8, 8)))
    rows = [jpeg + bytes(2**18 - len(jpeg))] * 8  # 256 KiB each, of a few bytes compressed
    archive = tmp_path / "p.parquet"
    with pq.ParquetWriter(archive, pa.schema([("image", pa.binary()), ("path", pa.string())]),
                          compression="zstd", use_dictionary=False) as writer:  # fmt: skip
        writer.write_table(pa.table({"image": rows, "path": [f"{i}.jpg" for i in range(8)]}))
        writer.write_table(pa.table({"image": [bytes(2**21)], "path": ["huge.jpg"]}))
    assert archive.stat().st_size < 20_000
    read = []
    iter_batches = pq.ParquetFile.iter_batches

    def spied(self, batch_size, row_groups, columns):
        read.append((row_groups, batch_size))
        return iter_batches(self, batch_size=batch_size, row_groups=row_groups, columns=columns)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spied)
    monkeypatch.setattr(colorize, "PARQUET_BATCH_BYTES", 2**20)
    cfg = config(str(archive), str(tmp_path / "o"), "m.pt", max_file_mb=1)
    unit = {"kind": "parquet", "url": str(archive), "prefix": archive.name, "done": [], "size": 1}
    *members, last = colorize.read_unit({"unit": json.dumps(unit)}, cfg)
    [(groups, batch_rows)] = read  # the second group never read
    assert groups == [0] and batch_rows in (3, 4)  # rows of 256 KiB (and their headers)
    assert [r["data"] for r in members[:8]] == rows and last["status"] == colorize_manifest.READ
    assert members[8]["source"].endswith("huge.jpg") and members[8]["status"] == "error"
    assert members[8]["reason"].startswith("file too large: its row declares 2097")
    # Dictionary-encoded (pyarrow's default), one value declared once stands for every row
    pq.write_table(pa.table({"image": rows * 4, "path": [f"{i}.jpg" for i in range(32)]}),
                   archive, compression="zstd")  # fmt: skip
    unit["size"], read[:] = archive.stat().st_size, []
    *members, _ = colorize.read_unit({"unit": json.dumps(unit)}, cfg)
    assert len(members) == 32 and all(r["status"] != "error" for r in members)
    assert [batch_rows for _, batch_rows in read] == [3]  # not 32 of the one declared value
    pq.write_table(pa.table({"image": [jpeg], "path": ["x" * 2**21]}), archive)
    unit["size"] = archive.stat().st_size
    [row] = colorize.read_unit({"unit": json.dumps(unit)}, cfg)
    assert row["status"] == "error" and "column 'path' holds 2097" in row["reason"]
    # One long name, dictionary-encoded, declared once for every row: counted as every row's
    pq.write_table(pa.table({"image": [jpeg] * 300, "path": ["x" * 2**13] * 300}), archive)
    with archive.open("rb") as f, pytest.raises(ValueError, match="holds 2457600 bytes of"):
        colorize._row_names(f, pq.ParquetFile(f), "path")


class _BreakingFile(io.RawIOBase):
    """A file whose reads fail with `error` once `limit` bytes have been read from it."""

    def __init__(self, data: bytes, limit: int, error: Exception) -> None:
        self._file, self._left, self._error = io.BytesIO(data), limit, error

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(position, whence)

    def tell(self) -> int:
        return self._file.tell()

    def readinto(self, buffer) -> int:
        if self._left <= 0:
            raise self._error
        read = self._file.readinto(memoryview(buffer)[: self._left])
        self._left -= read
        return read


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "zip"])
def test_an_archive_read_broken_off_by_storage_is_read_on(tmp_path, monkeypatch, kind) -> None:
    """A connection reset half-way through an archive: it is opened again and read on, each
    member given out once, in order; when the storage keeps failing, the archive gets its
    error row after the members read. Damaged bytes (a bad gzip stream) are not read again."""
    tail = np.random.default_rng(0).bytes  # after the PNG's end: no decoder reads it
    data = {f"{i}.png": encode(gray((8, 8)), "PNG") + tail(i * 20_000) for i in range(5)}
    if kind == "zip":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as z:
            for name, member in data.items():
                z.writestr(name, member)
        whole = buffer.getvalue()
    else:
        whole = tar_bytes(data)
        whole = gzip.compress(whole) if kind == "tar.gz" else whole
    archive = tmp_path / f"t.{kind}"
    archive.write_bytes(whole)
    cfg = config(str(archive), str(tmp_path / "o"), "m.pt")
    kind_of = kind.split(".")[0]
    unit = {"kind": kind_of, "url": str(archive), "prefix": archive.name, "done": [], "size": 1}
    breaks: list[Exception] = []
    monkeypatch.setattr(colorize, "ARCHIVE_RETRY_DELAY_S", 0.0)
    real = storage.filesystem

    class Flaky:  # the real file system, whose opened files break while `breaks` lasts
        def __init__(self, fs) -> None:
            self.fs = fs

        def open(self, path, mode="rb"):
            if not breaks:
                return self.fs.open(path, mode)
            return io.BufferedReader(_BreakingFile(whole, len(whole) // 2, breaks.pop(0)))

    monkeypatch.setattr(
        storage,
        "filesystem",
        lambda url, s3=None, **kw: (Flaky(real(url, s3, **kw)[0]), real(url, s3, **kw)[1]),
    )

    def read() -> list[dict]:
        return list(colorize.read_unit({"unit": json.dumps(unit)}, cfg))

    expected = [f"{archive}!{name}" for name in data]
    breaks[:] = [ConnectionResetError(104, "Connection reset by peer")]
    rows = read()
    read_through = (str(archive), colorize_manifest.read_through_reason(5, 1))
    assert [(r["source"], r["reason"]) for r in rows] == [(x, "") for x in expected] + [
        read_through
    ]
    # What s3fs raises as it is once its own retries run out: read on as well.
    from aiohttp.client_exceptions import ClientPayloadError

    breaks[:] = [ClientPayloadError("Response payload is not completed")]
    assert [r["source"] for r in read()] == [*expected, str(archive)]
    breaks[:] = [OSError(5, "I/O error")] * colorize.ARCHIVE_READ_ATTEMPTS
    rows = read()
    *members, last = rows
    assert [r["source"] for r in members] == expected[: len(members)] and 0 < len(members) < 5
    assert last["source"] == str(archive) and last["status"] == "error"
    assert f"unreadable archive after {len(members)} members: OSError" in last["reason"]
    if kind == "tar.gz":  # a gzip stream damaged half-way: read once
        breaks[:] = [gzip.BadGzipFile("damaged")] * 2
        rows = read()
        assert "BadGzipFile" in rows[-1]["reason"] and len(breaks) == 1


def test_names_that_are_not_utf8_are_colorized_under_latin1_names(tmp_path) -> None:
    """An old tar's Latin-1 member name and a file system name in another encoding: both
    read, their outputs named as Latin-1 reads them and their sources (the manifest's keys)
    with \\x escapes, text the manifest can store. A name reading as another's is refused."""
    data = encode(gray((8, 8)))
    src = tmp_path / "in"
    src.mkdir()
    (src / "ok.jpg").write_bytes(data)
    with open(os.path.join(os.fsencode(src), b"caf\xe9.jpg"), "wb") as f:
        f.write(data)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as t:
        info = tarfile.TarInfo("\u00e9t\u00e9.jpg")  # stored as the Latin-1 bytes e9 74 e9
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    (src / "old.tar").write_bytes(buffer.getvalue())
    cfg = config(str(src), str(tmp_path / "o"), "m.pt")
    units, top_level, _ = colorize.plan(cfg, [])
    rows = [r for u in units for r in colorize.read_unit({"unit": json.dumps(u)}, cfg)]
    rows = [r for r in rows if r["status"] != colorize_manifest.READ]  # old.tar's own row
    assert {r["rel"] for r in rows} == {"ok.jpg", "caf\u00e9.jpg", "old.tar/\u00e9t\u00e9.jpg"}
    assert all(r["status"] == "pending" and r["data"] == data for r in rows)
    sources = {r["source"] for r in rows}
    assert f"{src}/caf\\xe9.jpg" in top_level and f"{src}/old.tar!\\xe9t\\xe9.jpg" in sources
    for text in top_level + list(sources):
        text.encode("utf-8")  # what Arrow needs of the manifest's strings

    (src / "caf\u00e9.jpg").write_bytes(data)  # the same name in UTF-8
    units, _, _ = colorize.plan(cfg, [])
    rows = [r for u in units for r in colorize.read_unit({"unit": json.dumps(u)}, cfg)]
    rows = [r for r in rows if r["status"] != colorize_manifest.READ]
    refused = [r for r in rows if r["status"] == "error"]
    assert len(refused) == 1 and "reads as 'caf\u00e9.jpg' too" in refused[0]["reason"]
    assert len({r["source"] for r in rows}) == len(rows) == 4  # each input a row of its own


def test_an_archive_whose_members_folder_is_taken_is_refused(tmp_path, s3_server) -> None:
    """A member's output goes in a folder of its archive's name: an archive named as another
    reads (a Latin-1 name beside its UTF-8 twin), or one beside keys in that folder (S3 has
    `x.zip` and `x.zip/m.png` at once), is refused whole, not written over their outputs."""
    member = zip_bytes({"m.png": save(Image.fromarray(gray((8, 8))), "PNG")})
    src = tmp_path / "in"
    src.mkdir()
    (src / "\u00e9.zip").write_bytes(member)
    with open(os.path.join(os.fsencode(src), b"\xe9.zip"), "wb") as f:
        f.write(member)
    cfg = config(str(src), str(tmp_path / "o"), "m.pt")
    units, _, _ = colorize.plan(cfg, [])
    rows = [r for u in units for r in colorize.read_unit({"unit": json.dumps(u)}, cfg)]
    outputs = [r["rel"] for r in rows if r["status"] == "pending"]
    refused = [r for r in rows if r["status"] == "error"]
    assert outputs == ["\u00e9.zip/m.png"] and len(refused) == 1
    assert "another input's name reads as '\u00e9.zip' too" in refused[0]["reason"]

    root = s3_server.url("taken-folder")
    storage.write_bytes(storage.join(root, "x.zip"), member)
    storage.write_bytes(storage.join(root, "x.zip", "m.png"), save(Image.new("L", (4, 4)), "PNG"))
    cfg = config(root, s3_server.url("taken-folder-out"), "m.pt")
    units, _, _ = colorize.plan(cfg, [])
    items = {i["rel"]: i for u in units for i in u["items"]}
    assert set(items) == {"x.zip", "x.zip/m.png"} and "error" not in items["x.zip/m.png"]
    assert items["x.zip"]["error"] == (
        "its members' outputs would go in 'x.zip/', where another input's output 'x.zip/m.png' is"
    )


def test_a_repeated_member_name_resumes_each_copy_apart(tmp_path) -> None:
    """A tar holding `a.png` twice: with only the first copy done, the second is still read."""
    data = encode(gray((8, 8)), "PNG")
    archive = tmp_path / "t.tar"
    archive.write_bytes(tar_bytes([(name, data) for name in ("a.png", "b.png", "a.png")]))
    cfg = config(str(archive), str(tmp_path / "o"), "m.pt")
    unit = {"kind": "tar", "url": str(archive), "prefix": "t.tar", "done": [], "size": 1}
    first = [r["source"] for r in read_members(unit, cfg)]
    assert first == [f"{archive}!a.png", f"{archive}!b.png", f"{archive}!a.png (copy 2)"]
    unit["done"] = ["a.png"]
    rows = read_members(unit, cfg)
    assert [r["source"] for r in rows] == first[1:]
    assert "same output path" in rows[1]["reason"]  # the copy's output is the first's


def test_a_retried_archive_read_through_clears_its_error_row(tmp_path) -> None:
    """An archive whose read failed half-way (a storage error) has an error row; a retry of
    the errors that reads it through leaves its `read` row instead, which counts as no
    input."""
    data = encode(gray((8, 8)))
    archive = tmp_path / "in" / "t.tar"
    archive.parent.mkdir()
    archive.write_bytes(tar_bytes({"0.jpg": data, "1.jpg": data}))
    cfg = config(str(archive.parent), str(tmp_path / "o"), "m.pt", retry_errors=True)
    first = {"source": f"{archive}!0.jpg", "output": "t.tar/0.jpg", "status": "ok"}
    failed = {"source": str(archive), "output": "", "status": "error", "reason": "timeout"}
    units, _, skipped = colorize.plan(cfg, [first["source"]])
    assert skipped == 1 and [u["done"] for u in units] == [["0.jpg"]]
    rows = list(colorize.read_unit({"unit": json.dumps(units[0])}, cfg))
    # the member done before counts too
    read = colorize_manifest.read_through_reason(2, archive.stat().st_size)
    assert [(r["source"], r["status"], r["reason"]) for r in rows] == [
        (f"{archive}!1.jpg", "pending", ""),
        (str(archive), colorize_manifest.READ, read),
    ]
    (tmp_path / "o" / "t.tar").mkdir(parents=True)
    for name in ("0.jpg", "1.jpg"):
        (tmp_path / "o" / "t.tar" / name).write_bytes(data)
    second = first | {"source": f"{archive}!1.jpg", "output": "t.tar/1.jpg"}
    through = failed | {"status": colorize_manifest.READ, "reason": read}
    common = {"reason": "", "pages": 1, "width_px": 8, "height_px": 8, "model_sha256": "0",
              "temperature": 0.38, "seconds": 0.1}  # fmt: skip
    for time, batch in (("1", [first, failed]), ("2", [second, through])):
        rows = [common | row | {"time": time} for row in batch]
        colorize_manifest.write_part(rows, cfg.output, None)
    summary = colorize._finish(cfg, [str(archive)], skipped=0)
    assert (summary.inputs, summary.outputs, summary.errors) == (2, 2, 0)
    assert colorize_manifest.READ not in summary.table.column("status").to_pylist()


def test_an_archive_read_through_is_skipped_unopened_once_each_member_has_a_row(
    tmp_path,
) -> None:
    """A re-run opens an archive read through before only where a member of it has no row
    (the run was killed before that row was written; or, retrying errors, an error row), or
    where the archive's size has changed since. A file named like a member of it
    (`a.tar!x.jpg`) is not counted as one."""
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.tar", "b.zip", "c.tar", "a.tar!x.jpg"):
        (src / name).write_bytes(b"12345")
    url = lambda name: str(src / name)  # noqa: E731
    cfg = config(str(src), str(tmp_path / "o"), "m.pt")
    done = [url("a.tar!0.jpg"), url("a.tar!1.jpg"), url("b.zip!0.jpg"), url("c.tar!0.jpg")]
    read = {url("a.tar"): (2, 5), url("b.zip"): (2, 5)}  # c.tar was never read through
    units, _, skipped = colorize.plan(cfg, done, read)
    archives = [u["url"] for u in units if u["kind"] != "files"]
    assert archives == [url("b.zip"), url("c.tar")] and skipped == 4
    units, _, skipped = colorize.plan(cfg, [*done[1:], url("a.tar!x.jpg")], read)
    archives = [u["url"] for u in units if u["kind"] != "files"]
    assert archives == [url("a.tar"), url("b.zip"), url("c.tar")]  # a.tar's 0.jpg lacks a row
    (src / "a.tar").write_bytes(b"123456")  # appended to since it was read
    units, _, _ = colorize.plan(cfg, done, read)
    assert next(u["url"] for u in units if u["kind"] != "files") == url("a.tar")


def test_a_file_named_like_a_member_beside_its_archive_keeps_a_source_of_its_own(
    tmp_path,
) -> None:
    """`a.zip!x.png`, a file, beside `a.zip` holding `x.png`: two inputs, two sources (the
    member's numbered as a copy), two outputs, and a re-run finds both done."""
    torch.manual_seed(2)
    model = ColorizationNet(ModelConfig(width=1 / 16)).eval()
    png = encode(gray((8, 8)), "PNG")
    box = io.BytesIO()
    with zipfile.ZipFile(box, "w") as archive:
        archive.writestr("x.png", png)
        archive.writestr("y.png", png)
    files = {"a.zip": box.getvalue(), "a.zip!x.png": png}
    rows = _run_local(files, tmp_path, model, jpeg_path="cpu")
    inputs = {k: v for k, v in rows.items() if v["status"] != colorize_manifest.READ}
    assert sorted(inputs) == ["a.zip!x.png", "a.zip!x.png (copy 2)", "a.zip!y.png"]
    assert {r["status"] for r in inputs.values()} == {"ok"}
    assert sorted(r["output"] for r in inputs.values()) == ["a.zip!x.png", "a.zip/x.png",
                                                            "a.zip/y.png"]  # fmt: skip
    cfg = config(str(tmp_path / "in"), str(tmp_path / "out-cpu"), "m.pt")
    table = colorize_manifest.inputs_only(colorize_manifest.read(cfg.output, cfg.s3))
    done, written = (table.column(c).to_pylist() for c in ("source", "output"))
    read = colorize_manifest.archives_read(colorize_manifest.read(cfg.output, cfg.s3))
    units, _, skipped = colorize.plan(cfg, done, read, set(written))
    assert units == [] and skipped == 3


def test_a_file_named_like_a_member_added_after_its_archive_was_read(tmp_path) -> None:
    """`a.zip!x.png` added beside `a.zip` after a run read it: the row under its source was
    the member's, so the file is colorized, the member again under a copy's source, and
    the accounting holds; a third run has nothing to do. (The job's steps in this process,
    as `main` runs them for one image.)"""
    model = ColorizationNet(ModelConfig(width=1 / 16)).eval()
    png = encode(gray((8, 8)), "PNG")
    (tmp_path / "in").mkdir()
    with zipfile.ZipFile(tmp_path / "in" / "a.zip", "w") as archive:
        archive.writestr("x.png", png)
        archive.writestr("y.png", png)
    cfg = config(str(tmp_path / "in"), str(tmp_path / "out"), "m.pt", dtype="fp32")
    sha256 = "f" * 64

    def run() -> colorize.Summary:
        units, top_level, skipped = colorize.plan_left(cfg, sha256)
        colorize._run_in_process(units, cfg, model, colorize._provenance(sha256, cfg))
        return colorize._finish(cfg, top_level, skipped)

    assert run().outputs == 2
    (tmp_path / "in" / "a.zip!x.png").write_bytes(png)
    second = run()
    assert (second.inputs, second.outputs, second.errors, second.skipped) == (3, 3, 0, 1)
    rows = {r["source"].rsplit("/", 1)[1]: r["output"] for r in second.table.to_pylist()}
    assert rows == {"a.zip!x.png": "a.zip!x.png", "a.zip!x.png (copy 2)": "a.zip/x.png",
                    "a.zip!y.png": "a.zip/y.png"}  # fmt: skip
    assert run().skipped == 3


def test_members_named_like_numbered_copies_keep_sources_of_their_own(tmp_path) -> None:
    """`a.jpg`, `a.jpg` and a member named `a.jpg (copy 2)`: three sources, three rows."""
    data = encode(gray((8, 8)))
    archive = tmp_path / "t.tar"
    archive.write_bytes(tar_bytes([(name, data) for name in ("a.jpg", "a.jpg", "a.jpg (copy 2)")]))
    cfg = config(str(archive), str(tmp_path / "o"), "m.pt")
    unit = {"kind": "tar", "url": str(archive), "prefix": "t.tar", "done": [], "size": 1}
    sources = [r["source"] for r in read_members(unit, cfg)]
    assert len(set(sources)) == 3, sources


def test_device_cuda_asks_for_gpu_actors_before_the_cluster_has_gpus() -> None:
    """An autoscaling cluster starts GPU nodes only for actors that ask for GPUs."""
    cfg = config("in", "out", "m.pt")
    for device, actors, cluster, wanted in [("cuda", 4, 0, 4), ("cuda", 0, 0, 1),
                                            ("cuda", 0, 2, 2), ("auto", 4, 0, 0),
                                            ("auto", 0, 3, 3), ("cpu", 0, 3, 0)]:  # fmt: skip
        case = dataclasses.replace(cfg, device=device, model_actors=actors)
        assert colorize._gpus(case, cluster) == wanted, (device, actors, cluster)


def released_format_model(path) -> ColorizationNet:
    """A full-size network with random weights, saved as the authors' state dict."""
    torch.manual_seed(1)
    model = ColorizationNet(ModelConfig())
    for module in model.modules():  # random but non-trivial statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
    torch.save(model.state_dict(), path)
    return model.eval()


def scan16(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 24 x 36 16-bit ramp with grain, tinted orange (R > G > B, so that channels read in
    the wrong order move L by tens), as RGB (H, W, 3), and a 16-bit alpha (H, W)."""
    rng = np.random.default_rng(seed)
    scan = np.linspace(500, 65000, 24 * 36).reshape(24, 36)
    tint = np.dstack([scan, scan * 0.6, scan * 0.25]).astype(np.uint16)
    rgb16 = tint + rng.integers(0, 200, (24, 36, 3), dtype=np.uint16)
    return rgb16, rng.integers(0, 65536, (24, 36), dtype=np.uint16)


def assert_lightness_kept_at_16_bits(source_rgb16: np.ndarray, output_bgr16: np.ndarray) -> None:
    """The output (as OpenCV reads it: BGR, 16 bits) has the source's L to 16-bit precision."""
    assert output_bgr16.dtype == np.uint16 and output_bgr16.shape[:2] == source_rgb16.shape[:2]
    l_in, l_out = (
        rgb_to_lab(torch.from_numpy(rgb.astype(np.float32) / 65535).permute(2, 0, 1))[0]
        for rgb in (np.ascontiguousarray(source_rgb16), output_bgr16[..., 2::-1])
    )
    assert (l_out - l_in).abs().max() < 0.05  # 8 bits would be off by ~0.2
    assert len(np.unique(output_bgr16[..., 1] & 0xFF)) > 8  # the low bytes carry information


def test_16bit_colour_sources_keep_16_bits_alpha_and_orientation(tmp_path) -> None:
    """A 16-bit RGB PNG stored turned (EXIF orientation 6 in an eXIf chunk) and a 16-bit RGBA
    TIFF: 16-bit PNG outputs, upright, whose L follows the source's at 16-bit precision,
    alpha kept to the bit. Written and read back with OpenCV (BGR order), not the job's code."""
    import cv2

    torch.manual_seed(5)
    model = ColorizationNet(ModelConfig(width=1 / 16)).eval()
    rgb16, alpha16 = scan16(5)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: shown after a quarter turn clockwise
    png = cv2.imencode(".png", rgb16[..., ::-1])[1].tobytes()
    ihdr_end = 8 + 8 + 13 + 4  # signature, then IHDR's length, type, data and CRC
    body = b"eXIf" + exif.tobytes()
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    turned_png = png[:ihdr_end] + chunk + png[ihdr_end:]
    rgba_tif = cv2.imencode(".tiff", np.dstack([rgb16[..., ::-1], alpha16]))[1].tobytes()
    files = {"rgb16.png": turned_png, "rgba16.tif": rgba_tif}
    rows = _run_local(files, tmp_path, model, jpeg_path="cpu")
    for rel, shown in (("rgb16.png", np.rot90(rgb16, k=-1)), ("rgba16.tif", rgb16)):
        row = rows[rel]
        assert row["status"] == "ok" and row["output"] == rel, row  # format kept
        data = (row["root"] / row["output"]).read_bytes()
        assert_lightness_kept_at_16_bits(
            shown, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        )
    row = rows["rgba16.tif"]
    data = (row["root"] / row["output"]).read_bytes()
    rgba = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert rgba.shape[2] == 4 and np.array_equal(rgba[..., 3], alpha16)


def test_16bit_gray_with_alpha_png_keeps_16_bits() -> None:
    """PNG colour type 4 at 16 bits (Pillow reads it at 8): its gray and alpha to the bit."""
    rng = np.random.default_rng(4)
    gray16, alpha16 = (rng.integers(0, 65536, (5, 7), dtype=np.uint16) for _ in range(2))
    rows = np.dstack([gray16, alpha16]).astype(">u2").reshape(5, -1).view(np.uint8)
    raw = np.hstack([np.zeros((5, 1), np.uint8), rows]).tobytes()  # filter 0 a row
    chunk = picture_files._png_chunk
    ihdr = struct.pack(">IIBBBBB", 7, 5, 16, 4, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
    decoded = picture_files.decode(png + chunk(b"IEND", b""), 10**6)
    (page,) = decoded.pages
    assert page.bits == 16 and np.array_equal(page.alpha, alpha16)
    expected = torch.from_numpy(gray16.astype(np.float32) / 65535).expand(3, -1, -1)
    torch.testing.assert_close(page.rgb[0], expected, rtol=0, atol=1e-7)
    assert picture_files.output_format(decoded, "png") == "PNG16"
    assert picture_files.output_format(decoded, "jpeg") == "PNG16"  # alpha: a PNG all the same


@pytest.mark.parametrize("maxval", [65535, 1023])
def test_a_colour_ppm_of_more_than_8_bits_keeps_them(maxval: int) -> None:
    """A binary PPM at 16 bits (its header with a long comment), and a plain (text) one
    whose samples go up to 1023: read at 16 bits (Pillow reads both at 8), each sample
    scaled from its maxval, a PNG16 out."""
    rgb16, _ = scan16(6)
    stored = np.round(rgb16 / 65535 * maxval).astype(np.uint16)
    header = f"P6\n# scanned {'at 1200 dpi ' * 500}\n36 24\n{maxval}\n".encode()  # 6 KB
    ppm = header + stored.astype(">u2").tobytes()
    if maxval != 65535:
        samples = " ".join(str(v) for v in stored.ravel())
        ppm = f"P3\n36 24 # scanned\n{maxval}\n{samples}\n".encode()
    decoded = picture_files.decode(ppm, 10**6)
    (page,) = decoded.pages
    expected = torch.from_numpy(stored.astype(np.float64) * (65535 / maxval))
    assert page.bits == 16 and picture_files.output_format(decoded, "keep") == "PNG16"
    torch.testing.assert_close(
        page.rgb[0].permute(1, 2, 0).double() * 65535, expected.round(), rtol=0, atol=0.6
    )


def test_a_16bit_tiff_of_colour_planes_is_read_at_16_bits_upright() -> None:
    """One plane a channel (PlanarConfiguration 2), which OpenCV and Pillow read as if the
    samples were interleaved: read with tifffile, its alpha kept, turned by its tag."""
    import tifffile

    rng = np.random.default_rng(5)
    rgba16 = rng.integers(0, 65536, (4, 3, 5), dtype=np.uint16)  # planes first
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, rgba16, photometric="rgb", planarconfig="separate",
                     extrasamples=["unassalpha"], extratags=[(274, 3, 1, 6, True)])  # fmt: skip
    (page,) = picture_files.decode(buffer.getvalue(), 10**6).pages
    upright = np.rot90(rgba16.transpose(1, 2, 0), k=-1)  # orientation 6: a quarter clockwise
    assert page.bits == 16 and np.array_equal(page.alpha, upright[..., 3])
    got = (page.rgb[0].permute(1, 2, 0).numpy() * 65535).round()
    assert np.array_equal(got, upright[..., :3])


@pytest.mark.parametrize("planarconfig", ["contig", "separate"])
def test_a_16bit_cmyk_tiff_is_read_at_16_bits_as_pillow_converts_cmyk(planarconfig) -> None:
    """CMYK at 16 bits (Pillow and OpenCV keep 8 of them) comes out RGB at 16 bits, upright,
    converted as Pillow converts 8-bit CMYK: within its rounding of the same picture."""
    import tifffile

    rng = np.random.default_rng(6)
    cmyk16 = rng.integers(0, 65536, (3, 5, 4), dtype=np.uint16)
    stored = cmyk16 if planarconfig == "contig" else cmyk16.transpose(2, 0, 1)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, stored, photometric="separated", planarconfig=planarconfig,
                     extratags=[(274, 3, 1, 6, True)])  # fmt: skip
    decoded = picture_files.decode(buffer.getvalue(), 10**6)
    (page,) = decoded.pages
    assert page.bits == 16 and page.alpha is None
    assert picture_files.output_format(decoded, "keep") == "TIFF16"
    pillow = np.asarray(Image.fromarray((cmyk16 >> 8).astype(np.uint8), "CMYK").convert("RGB"))
    upright = np.rot90(pillow, k=-1)  # orientation 6: a quarter clockwise
    got = page.rgb[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(got - upright).max() <= 2.0
    assert len(np.unique((page.rgb[0] * 65535).round().int() & 0xFF)) > 8  # 16 bits of it


@pytest.mark.parametrize("compression", ["lzw", "zlib"])
def test_a_compressed_16bit_gray_with_alpha_tiff_is_read(compression) -> None:
    """tifffile reads LZW and Deflate, which scanners write, through imagecodecs."""
    import tifffile

    la16 = np.random.default_rng(3).integers(0, 65536, (6, 5, 2), dtype=np.uint16)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, la16, photometric="minisblack", extrasamples=["unassalpha"],
                     compression=compression)  # fmt: skip
    (page,) = picture_files.decode(buffer.getvalue(), 10**6).pages
    assert page.bits == 16 and np.array_equal(page.alpha, la16[..., 1])
    assert np.array_equal((page.rgb[0, 0].numpy() * 65535).round(), la16[..., 0])


@pytest.mark.parametrize("bits", [8, 16])
def test_a_gray_tiff_whose_levels_count_from_white_is_read_as_it_looks(bits) -> None:
    """Photometric MinIsWhite: 0 is white. Pillow turns 8-bit levels itself, not 16-bit."""
    import tifffile

    dtype, top = (np.uint8, 255) if bits == 8 else (np.uint16, 65535)
    stored = np.array([[0, top // 4, top]], dtype)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, stored, photometric="miniswhite")
    (page,) = picture_files.decode(buffer.getvalue(), 10**6).pages
    assert page.bits == bits
    np.testing.assert_allclose(page.rgb[0, 0, 0].numpy(), 1 - stored[0] / top, atol=1e-6)


@pytest.mark.parametrize("planarconfig", ["contig", "separate"])
def test_a_16bit_gray_with_alpha_tiff_is_read_and_written_at_16_bits(planarconfig) -> None:
    """Gray with alpha at 16 bits, which Pillow does not open: read with tifffile, upright,
    its metadata carried, and written as a 16-bit RGBA TIFF with its alpha to the bit."""
    import tifffile

    rng = np.random.default_rng(7)
    la16 = rng.integers(0, 65536, (3, 5, 2), dtype=np.uint16)
    stored = la16 if planarconfig == "contig" else la16.transpose(2, 0, 1)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, stored, photometric="minisblack", extrasamples=["unassalpha"],
                     planarconfig=planarconfig, description="a scan", resolution=(300, 200),
                     resolutionunit="INCH", extratags=[(274, 3, 1, 6, True)])  # fmt: skip
    decoded = picture_files.decode(buffer.getvalue(), 10**6)
    (page,) = decoded.pages
    upright = np.rot90(la16, k=-1)  # orientation 6: a quarter clockwise
    assert page.bits == 16 and np.array_equal(page.alpha, upright[..., 1])
    assert np.array_equal((page.rgb[0, 0].numpy() * 65535).round(), upright[..., 0])
    assert decoded.meta.dpi == (200, 300)  # across and down, upright
    assert picture_files.output_format(decoded, "keep") == "TIFF16"
    colour = np.dstack([upright[..., 0]] * 3)
    out = picture_files.encode([colour], decoded, "TIFF16", "colorized by test", 95)
    with tifffile.TiffFile(io.BytesIO(out)) as tif:
        written = tif.pages.first
        pixels = written.asarray()
        assert pixels.dtype == np.uint16 and np.array_equal(pixels[..., 3], upright[..., 1])
        assert written.tags[270].value == "a scan"
    # On GPUs, JPEGs go to the device: anything else goes on to `decode`, unrefused.
    cfg = colorize.ColorizeConfig(input="/in", output="/out", model="/m.pt", jpeg_path="device")
    assert colorize._device_jpeg(buffer.getvalue(), cfg, "") is None
    too_small = 10  # pixels
    with pytest.raises(colorize.BadImage, match="image too large"):
        picture_files.decode(buffer.getvalue(), too_small)
    truncated = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    with pytest.raises(colorize.BadImage):
        picture_files.decode(truncated, 10**6)
    # The same in floats: read to the 16-bit level; a volume (its depth beyond the pixel
    # limit's count): refused, not misread
    floats = io.BytesIO()
    tifffile.imwrite(floats, la16.astype(np.float32) / 65535, photometric="minisblack",
                     extrasamples=["unassalpha"])  # fmt: skip
    (page,) = picture_files.decode(floats.getvalue(), 10**6).pages
    assert page.bits == 16 and np.array_equal(page.alpha, la16[..., 1])
    assert np.array_equal((page.rgb[0, 0].numpy() * 65535).round(), la16[..., 0])
    volume = io.BytesIO()
    tifffile.imwrite(volume, np.stack([la16] * 3), photometric="minisblack",
                     extrasamples=["unassalpha"], volumetric=True)  # fmt: skip
    with pytest.raises(colorize.BadImage, match=r"a TIFF \(or camera raw\) file of a kind"):
        picture_files.decode(volume.getvalue(), 10**6)


def test_a_16bit_tiff_of_premultiplied_alpha_comes_out_unpremultiplied() -> None:
    colour, alpha = 20000, np.arange(1, 21, dtype=np.uint16).reshape(4, 5) * 3000
    stored = np.dstack([(colour * alpha.astype(np.float64) / 65535).astype(np.uint16)] * 3
                       + [alpha])  # fmt: skip
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, stored, photometric="rgb", extrasamples=["assocalpha"])
    (page,) = picture_files.decode(buffer.getvalue(), 10**6).pages
    assert page.bits == 16 and np.array_equal(page.alpha, alpha)
    error = np.abs(page.rgb[0].numpy() * 65535 - colour)  # stored rounded down, divided:
    assert np.all(error <= 65535 / alpha + 0.5)  # within a stored level over alpha


@pytest.mark.parametrize("source", ["JPEG", "PNG", "TIFF"])
def test_the_print_resolution_is_carried_into_every_output_format(source) -> None:
    """A scan's dots an inch (JFIF density, PNG pHYs, TIFF resolution tags) come out as
    they went in, across and down the upright picture (orientation 6 swaps them)."""
    rgb = photo_rgb("coffee", 40)[:30]
    exif = Image.Exif()
    exif[0x0112] = 6  # a quarter turn clockwise: 30 x 40 stored, 40 x 30 upright
    data = save(Image.fromarray(rgb), source, dpi=(600, 300), exif=exif.tobytes())
    decoded = picture_files.decode(data, 10**6)
    assert decoded.meta.dpi == pytest.approx((300, 600), rel=1e-4)
    upright = np.rot90(rgb, k=-1).copy()
    for fmt, pixels in (("JPEG", upright), ("PNG", upright), ("TIFF", upright),
                        ("PNG16", upright.astype(np.uint16) * 257),
                        ("TIFF16", upright.astype(np.uint16) * 257)):  # fmt: skip
        out = Image.open(io.BytesIO(picture_files.encode([pixels], decoded, fmt, "p", 90)))
        assert out.size == (30, 40) and out.info["dpi"] == pytest.approx((300, 600), rel=1e-4)

    # The device path's JPEG: its encoder's own JFIF segment is replaced by the source's.
    segments = picture_files.app_segments(b"", icc=None, xmp=None, iptc=None, dpi=(300, 600))
    encoded = save(Image.fromarray(upright), "JPEG", dpi=(72, 72))
    spliced = picture_files.with_segments(encoded, segments)
    assert spliced.count(b"JFIF\0") == 1 and Image.open(io.BytesIO(spliced)).info["dpi"] == (
        300, 600,
    )  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(spliced))),
                          np.asarray(Image.open(io.BytesIO(encoded))))  # fmt: skip


def test_a_picture_without_a_print_resolution_gets_none() -> None:
    """Pillow reads 72 dpi into a JPEG and 1 into a TIFF that say nothing: not carried. An
    EXIF resolution is, its across and down swapped with the picture's quarter turn."""
    rgb = photo_rgb("coffee", 24)
    plain_jpeg = save(Image.fromarray(rgb), "JPEG")  # JFIF density 1:1, no unit
    plain_tiff = save(Image.fromarray(rgb), "TIFF")
    for data in (plain_jpeg, plain_tiff):
        decoded = picture_files.decode(data, 10**6)
        assert decoded.meta.dpi is None
        for fmt in ("PNG", "TIFF"):
            out = Image.open(io.BytesIO(picture_files.encode([rgb], decoded, fmt, "p", 90)))
            assert "dpi" not in out.info if fmt == "PNG" else 282 not in out.tag_v2
    exif = Image.Exif()
    exif[0x0112], exif[0x011A], exif[0x011B], exif[0x0128] = 6, 600.0, 300.0, 2
    turned = save(Image.fromarray(rgb), "JPEG", exif=exif.tobytes())
    meta = picture_files.decode(turned, 10**6).meta
    assert meta.dpi == (300, 600) and (meta.exif[0x011A], meta.exif[0x011B]) == (300, 600)


def test_an_xmp_orientation_is_found_in_a_megabyte_of_white_space() -> None:
    """A small compressed PNG can hold that much XMP: its search takes time linear in it."""
    xmp = b"<x:xmpmeta>" + b" " * 2**20 + b'<rdf:Description tiff:Orientation="6"/>'
    assert picture_files._upright_xmp(xmp) == xmp.replace(b' tiff:Orientation="6"', b"")


def test_16bit_gray_png_transparency_becomes_its_alpha() -> None:
    gray16 = (np.arange(30, dtype=np.uint16).reshape(5, 6) * 2000).astype(np.uint16)
    png = save(Image.fromarray(gray16), "PNG", transparency=4000)  # tRNS: level 4000 clear
    (page,) = picture_files.decode(png, 10**6).pages
    assert page.bits == 16 and page.alpha.dtype == np.uint16
    assert np.array_equal(page.alpha, np.where(gray16 == 4000, 0, 65535))


@pytest.mark.parametrize(
    ("values", "top"),
    [(np.linspace(0, 232, 30, dtype=np.float32), 255.0),  # float gray in [0, 255]
     (np.linspace(0, 0.8, 30, dtype=np.float32), 1.0),  # float gray in [0, 1]
     (np.linspace(0, 60000, 30, dtype=np.float32), 65535.0),  # 16-bit levels (ImageJ)
     (np.linspace(0, 2e5, 30, dtype=np.float32), 2e5),  # past them: up to the largest
     (np.linspace(0, 2**20, 30).astype(np.int32), 2.0**20)],  # 32-bit gray past 16 bits
)  # fmt: skip
def test_32bit_gray_tiffs_keep_their_range(values: np.ndarray, top: float) -> None:
    (page,) = picture_files.decode(save(Image.fromarray(values.reshape(5, 6)), "TIFF"), 10**6).pages
    expected = torch.from_numpy((values / top).astype(np.float32)).reshape(1, 1, 5, 6)
    torch.testing.assert_close(page.rgb, expected)


@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_tiff_iptc_stored_as_long_is_read_as_its_bytes(byteorder) -> None:
    """Photoshop stores IPTC as LONG values, of which Pillow keeps the first: the block is
    read whole, in the file's byte order (a misread once made a 470 MB block of zeros)."""
    import tifffile

    block = IPTC + bytes(-len(IPTC) % 4)
    values = struct.unpack(f"{byteorder}{len(block) // 4}I", block)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, gray((4, 6)), byteorder=byteorder,
                     extratags=[(33723, "I", len(values), values, True)])  # fmt: skip
    assert picture_files.decode(buffer.getvalue(), 10**6).meta.iptc == block


def test_8bit_tiff_outputs_carry_provenance_and_metadata() -> None:
    decoded = picture_files.decode(jpeg_with_metadata(), 10**6)
    rgb = [np.full((40, 24, 3), 120, np.uint8)]
    tiff = Image.open(io.BytesIO(picture_files.encode(rgb, decoded, "TIFF", "made by us", 95)))
    tags = tiff.tag_v2
    assert tags[picture_files.PROVENANCE_EXIF_TAG] == "made by us"
    assert tags[0x013B] == "A. Archivist" and b"archive-42" in tags[700]
    assert tags[33723] == IPTC and tiff.info["icc_profile"] == SRGB_ICC


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_16bit_alpha_goes_into_8bit_formats_at_the_nearest_level(fmt: str) -> None:
    """WebP holds 8 bits: the alpha's nearest level. A JPEG cannot hold the alpha at all:
    a PNG is written instead, and then at 16 bits, as the picture has them."""
    rgb16, alpha16 = scan16(3)
    png = picture_files.encode_png16(rgb16, picture_files.Metadata(), b"", "p", alpha16)
    decoded = picture_files.decode(png, 10**6)
    chosen = picture_files.output_format(decoded, fmt.lower())
    assert chosen == ("PNG16" if fmt == "JPEG" else "WEBP")
    out = picture_files.encode([rgb16], decoded, chosen, "p", 100)
    if chosen == "PNG16":
        assert np.array_equal(picture_files.decode(out, 10**6).pages[0].alpha, alpha16)
        return
    alpha = np.asarray(Image.open(io.BytesIO(out)).getchannel("A"))
    assert np.array_equal(alpha, np.round(alpha16 / 257).astype(np.uint8))  # not its top byte


def test_metadata_too_large_for_a_jpeg_is_left_out_not_the_picture() -> None:
    """A maker's note past a JPEG segment's 64 KB goes, then the rest of an EXIF too large;
    an XMP packet or IPTC records too large are left out. The provenance tag stays, and the
    CPU and device paths write the same."""
    from PIL import ExifTags

    decoded = picture_files.decode(jpeg_with_metadata(), 10**6)
    exif = decoded.meta.exif
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.MakerNote] = bytes(70_000)
    rgb = [np.full((40, 24, 3), 120, np.uint8)]
    image = Image.open(io.BytesIO(picture_files.encode(rgb, decoded, "JPEG", "us", 95)))
    kept = image.getexif()
    assert kept[picture_files.PROVENANCE_EXIF_TAG] == "us" and kept[0x013B] == "A. Archivist"
    assert ExifTags.Base.MakerNote not in kept.get_ifd(ExifTags.IFD.Exif)
    exif[0x010E] = "x" * 70_000  # ImageDescription: too large even without the note
    decoded.meta.xmp, decoded.meta.iptc = b"<x/>" * 20_000, IPTC * (70_000 // len(IPTC))
    image = Image.open(io.BytesIO(picture_files.encode(rgb, decoded, "JPEG", "us", 95)))
    assert dict(image.getexif()) == {picture_files.PROVENANCE_EXIF_TAG: "us"}
    assert "xmp" not in image.info and "photoshop" not in image.info
    on_device = picture_files.app_segments(
        picture_files.exif_bytes(decoded.meta, "us", picture_files.EXIF_SEGMENT_MAX),
        icc=None, xmp=decoded.meta.xmp, iptc=decoded.meta.iptc,
    )  # fmt: skip
    assert on_device.count(b"\xff\xe1") == 1 and b"\xff\xed" not in on_device


def test_pixel_limit_bounds_all_pages_together() -> None:
    pages = [Image.fromarray(gray((100, 100))) for _ in range(5)]
    data = save(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert len(picture_files.decode(data, 50_000).pages) == 5
    with pytest.raises(colorize.BadImage, match="pages 0-4 hold 50000 pixels"):
        picture_files.decode(data, 49_999)
    # Tiny pages count as what the network takes of each: a file of many 1x1 pages is a bomb.
    tiny = [Image.fromarray(gray((1, 1))) for _ in range(5)]
    data = save(tiny[0], "TIFF", save_all=True, append_images=tiny[1:])
    assert len(picture_files.decode(data, 40_001, min_page_px=10_000).pages) == 5
    with pytest.raises(colorize.BadImage, match="40001 pixels, each after the first counted"):
        picture_files.decode(data, 40_000, min_page_px=10_000)
    assert len(picture_files.decode(save(tiny[0], "TIFF"), 1, 10_000).pages) == 1  # one page


def test_a_file_of_more_pages_than_a_batch_colorizes_as_in_one(tmp_path) -> None:
    """The network takes a batch's pages a batch's worth at a time, each page's ab its own."""
    torch.manual_seed(4)
    model = ColorizationNet(ModelConfig(width=1 / 16, bn_moving_average=0.0))
    with torch.no_grad():  # BatchNorm statistics of L images: colours that follow the input
        model.train()(torch.rand(4, 1, 64, 64) * 100)
    model.eval()
    names = ("coffee", "astronaut", "chelsea", "rocket", "coffee")
    pages = [Image.fromarray(gray((40 + 8 * i, 56), name)) for i, name in enumerate(names)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "book.tif").write_bytes(
        save(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    )
    ab = []
    for batch_size in (8, 2):
        cfg = config(str(tmp_path / "in"), str(tmp_path / "o"), "m.pt", dtype="fp32",
                     jpeg_path="cpu", batch_size=batch_size)  # fmt: skip
        units, _, _ = colorize.plan(cfg, [])
        rows = [r for u in units for r in colorize.read_unit({"unit": json.dumps(u)}, cfg)]
        prepared = [colorize.prepare_row(row, cfg, "provenance") for row in rows]
        out = colorize.Colorizer(cfg, model)(colorize._as_batch(prepared))
        assert list(out["pages"]) == [5]
        ab.append(torch.from_numpy(np.frombuffer(out["ab_small"][0], np.float32).copy()))
    torch.testing.assert_close(ab[1], ab[0], rtol=1e-5, atol=1e-6)
    each = ab[0].view(5, -1)  # each page's own: none the same as the page before it
    assert all(not torch.allclose(each[i], each[i + 1], atol=1e-3) for i in range(4))


def test_the_model_stage_passes_on_rows_no_longer_pending(tmp_path) -> None:
    """A row given up after it was decoded (pages, network input and all) reaches the model
    actor with status error: it is passed on as it is, not run through the network."""
    (tmp_path / "in").mkdir()
    for name in ("a", "b"):
        (tmp_path / "in" / f"{name}.jpg").write_bytes(encode(gray((24, 32))))
    cfg = config(str(tmp_path / "in"), str(tmp_path / "o"), "m.pt", jpeg_path="cpu")
    units, _, _ = colorize.plan(cfg, [])
    rows = [r for u in units for r in colorize.read_unit({"unit": json.dumps(u)}, cfg)]
    batch = colorize._as_batch([colorize.prepare_row(row, cfg) for row in rows])
    batch["status"][1], batch["reason"][1] = "error", "given up"
    model = ColorizationNet(ModelConfig(width=1 / 16)).eval()
    out = colorize.Colorizer(cfg, model).colorize(batch)
    assert list(out["pages"]) == [1, 1] and list(out["status"]) == ["pending", "error"]
    assert len(out["ab_small"][0]) > 0 and out["ab_small"][1] == b""


def test_multipage_16bit_tiff_keeps_pages_bits_alpha_and_metadata(tmp_path) -> None:
    """A TIFF of a 16-bit RGB page stored turned (orientation 6), a 16-bit RGBA page and an
    8-bit gray page, with ICC, XMP and an Artist tag: a TIFF of three pages at 16 bits, the
    first shown upright, L kept at 16-bit precision,
    alpha to the bit, the metadata and the provenance tag carried. The source is written
    with tifffile and the output read with OpenCV and Pillow, not with the job's code."""
    import cv2
    import tifffile

    torch.manual_seed(6)
    model = ColorizationNet(ModelConfig(width=1 / 16)).eval()
    rgb16, alpha16 = scan16(6)
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as tiff:
        tags = [
            (315, "s", 0, "A. Archivist", True),
            (34675, "B", len(SRGB_ICC), SRGB_ICC, True),
            (700, "B", len(XMP), XMP, True),
            (274, "H", 1, 6, True),
        ]  # stored turned
        tiff.write(rgb16, photometric="rgb", compression="zlib", extratags=tags, metadata=None)
        tiff.write(np.dstack([rgb16, alpha16]), photometric="rgb", extrasamples=["unassalpha"],
                   metadata=None)  # fmt: skip
        tiff.write(gray((20, 30)), photometric="minisblack", metadata=None)
    rows = _run_local({"pages.tif": buffer.getvalue()}, tmp_path, model, jpeg_path="cpu")
    row = rows["pages.tif"]
    assert (row["status"], row["output"], row["pages"]) == ("ok", "pages.tif", 3), row
    data = (row["root"] / row["output"]).read_bytes()
    ok, pages = cv2.imdecodemulti(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert ok and [p.shape for p in pages] == [(36, 24, 3), (24, 36, 4), (20, 30, 3)]
    assert pages[2].dtype == np.uint16
    assert_lightness_kept_at_16_bits(np.rot90(rgb16, k=-1), pages[0])  # shown upright
    assert_lightness_kept_at_16_bits(rgb16, pages[1])
    assert np.array_equal(pages[1][..., 3], alpha16)
    image = Image.open(io.BytesIO(data))
    assert image.n_frames == 3 and image.tag_v2[315] == "A. Archivist"
    assert "f" * 64 in image.tag_v2[picture_files.PROVENANCE_EXIF_TAG]
    assert image.info["icc_profile"] == SRGB_ICC and b"archive-42" in bytes(image.tag_v2[700])


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_an_animation_is_colorized_frame_by_frame_and_keeps_its_timing(tmp_path, fmt) -> None:
    """Three different gray frames (GIF, APNG, lossless WebP), the second with transparent
    pixels (which Pillow's GIF writer drops), shown 100, 200 and 300 ms and played twice:
    every frame colorized, its L kept, the timing and the transparency carried (a GIF as an
    APNG). Read back with Pillow."""
    torch.manual_seed(8)
    model = ColorizationNet(ModelConfig(width=1 / 16)).eval()
    frames = [Image.fromarray(gray((24, 32), name)).convert("RGBA")
              for name in ("coffee", "chelsea", "astronaut")]  # fmt: skip
    frames[1].putalpha(Image.fromarray(np.where(np.arange(32) < 8, 0, 255).astype(np.uint8)
                                       [None].repeat(24, 0)))  # fmt: skip
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = save(frames[0], fmt, save_all=True, append_images=frames[1:],
                duration=[100, 200, 300], loop=2, **options)  # fmt: skip
    name = f"reel.{fmt.lower()}"
    row = _run_local({name: data}, tmp_path, model, jpeg_path="cpu")[name]
    assert (row["status"], row["pages"]) == ("ok", 3), row
    assert row["output"] == (f"{name}.png" if fmt == "GIF" else name)
    out, source = Image.open(row["root"] / row["output"]), Image.open(io.BytesIO(data))
    assert out.format == ("WEBP" if fmt == "WEBP" else "PNG") and out.n_frames == 3
    assert out.info["loop"] == (3 if fmt == "GIF" else 2)  # plays: a GIF counts repeats

    def lightness(rgba: np.ndarray) -> torch.Tensor:
        return rgb_to_lightness(torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1) / 255)

    for index in range(3):
        out.seek(index)
        source.seek(index)
        out.load()
        assert out.info["duration"] == 100 * (index + 1)
        rgba, rgba_in = (np.asarray(im.convert("RGBA")) for im in (out, source))
        seen = rgba[..., 3] > 0
        assert np.array_equal(seen, rgba_in[..., 3] > 0)
        assert fmt == "GIF" or seen.all() != (index == 1)  # (Pillow's GIF frames: opaque)
        difference = (lightness(rgba) - lightness(rgba_in))[0][torch.from_numpy(seen)]
        assert difference.abs().max() < 1.0  # 8-bit rounding (WebP: lossless with alpha)
        assert np.ptp(rgba[..., :3].astype(int), axis=-1)[seen].max() > 0  # colorized


def test_released_format_weights_colorize_a_local_image_like_the_reference(tmp_path) -> None:
    model = released_format_model(tmp_path / "colorization_release_v2-9b330a0b.pth")
    rgb = photo_rgb("chelsea", size=48)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cat.png").write_bytes(encode(rgb, "PNG"))
    cfg = config(str(tmp_path / "in" / "cat.png"), str(tmp_path / "out"),
                 str(tmp_path / "colorization_release_v2-9b330a0b.pth"), dtype="fp32")  # fmt: skip
    summary = colorize.main(cfg)  # one local image: in-process, no Ray
    assert (summary.inputs, summary.outputs) == (1, 1)
    got = np.asarray(Image.open(tmp_path / "out" / "cat.png"), np.float32) / 255
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255
    want = reference_colorize(model, x, infer_px=INFER_PX, T=cfg.temperature)[0].permute(1, 2, 0)
    assert np.abs(got - want.numpy()).max() <= 1.01 / 255  # the same math, up to 8-bit rounding
    assert np.abs(got - rgb / 255).max() > 0.05  # and it did change the colours


def test_the_accounting_counts_each_archive_read_through_by_its_member_rows() -> None:
    """An archive's READ row says how many members it has; a member row lost on the way
    (an archive with fewer rows than that) fails the final accounting, while a file beside
    the archive named like one of its members is no member of it."""
    manifest = colorize_manifest

    def row(source: str, status: str = "ok", reason: str = "") -> dict:
        return {"source": source, "status": status, "reason": reason}

    rows = [
        row("/in/a.tar", manifest.READ, manifest.read_through_reason(3, 100)),
        row("/in/a.tar!x.png"), row("/in/a.tar!y.png", "error", "corrupt"),
        row("/in/a.tar!z.png"),  # a file of its own beside a.tar
        row("/in/b.zip", manifest.READ, manifest.read_through_reason(1, 50)),
        row("/in/b.zip!p.jpg"),
    ]  # fmt: skip
    table = pa.Table.from_pylist(rows)
    tops = ["/in/a.tar", "/in/a.tar!z.png", "/in/b.zip"]
    short = colorize._archives_short(table, manifest.inputs_only(table), tops)
    assert short == ["/in/a.tar: 2 of 3"]
    inputs = manifest.inputs_only(table)
    assert colorize._archives_short(table, inputs, tops[1:]) == []  # a.tar gone from INPUT
    rows.append(row("/in/a.tar!w.png"))
    table = pa.Table.from_pylist(rows)
    assert colorize._archives_short(table, manifest.inputs_only(table), tops) == []


def test_an_output_of_another_model_or_temperature_is_not_gone_on_with(tmp_path) -> None:
    """Its outputs and a re-run's would be colours of two models (a training run's folder
    as --model names its newest checkpoint): refused before any work, naming both."""
    from colorcore import weights

    weights.save_checkpoint(str(tmp_path / "a.pt"), ColorizationNet(ModelConfig(width=1 / 16)))
    (tmp_path / "cat.png").write_bytes(encode(gray((16, 16)), "PNG"))
    cfg = config(str(tmp_path / "cat.png"), str(tmp_path / "out"), str(tmp_path / "a.pt"))
    assert colorize.main(cfg).outputs == 1
    assert colorize.main(cfg).outputs == 1  # the same again: done already
    with pytest.raises(ValueError, match=r"holds 1 outputs of another model or temperature"):
        colorize.main(dataclasses.replace(cfg, temperature=0.5))
    torch.manual_seed(1)
    weights.save_checkpoint(str(tmp_path / "b.pt"), ColorizationNet(ModelConfig(width=1 / 16)))
    with pytest.raises(ValueError, match=r"at 0.38, this run [0-9a-f]{12} at 0.38"):
        colorize.main(dataclasses.replace(cfg, model=str(tmp_path / "b.pt")))


def test_an_input_that_ran_out_of_memory_is_tried_again_by_a_re_run(tmp_path, monkeypatch):
    """Running out of memory is the node's state, not the input's: its error row says so,
    and the same command run again colorizes it (other errors wait for --retry-errors)."""
    from colorcore import weights

    weights.save_checkpoint(str(tmp_path / "a.pt"), ColorizationNet(ModelConfig(width=1 / 16)))
    (tmp_path / "cat.png").write_bytes(encode(gray((16, 16)), "PNG"))
    cfg = config(str(tmp_path / "cat.png"), str(tmp_path / "out"), str(tmp_path / "a.pt"))
    real = picture_files._page

    def no_room(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 1234 bytes")  # fmt: skip

    monkeypatch.setattr(picture_files, "_page", no_room)
    first = colorize.main(cfg)
    assert (first.outputs, first.errors) == (0, 1)
    rows = colorize_manifest.compact(cfg.output, None).to_pylist()
    assert rows[0]["reason"].startswith(colorize.OUT_OF_MEMORY)
    monkeypatch.setattr(picture_files, "_page", real)
    assert colorize.main(cfg).outputs == 1


def test_one_local_image_is_colorized_without_importing_ray(tmp_path) -> None:
    """The single-image use starts fast: it never imports Ray (0.4 s with what it brings)."""
    import subprocess
    import sys

    from colorcore import weights

    model = tmp_path / "tiny.pt"
    weights.save_checkpoint(str(model), ColorizationNet(ModelConfig(width=1 / 16)))
    (tmp_path / "a.png").write_bytes(encode(gray((16, 16)), "PNG"))
    argv = ["jobs.colorize", str(tmp_path / "a.png"), str(tmp_path / "out"), "--model", str(model)]
    code = (
        f"import runpy, sys\nsys.argv = {argv!r}\ntry:\n"
        "    runpy.run_module('jobs.colorize', run_name='__main__')\n"
        "finally:\n    print('ray imported:', 'ray' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "a.png").exists()
    assert done.stdout.strip().splitlines()[-1] == "ray imported: False"


def test_bf16_autocast_stays_close_to_fp32(tmp_path) -> None:
    """Stated tolerance: bf16-autocast annealed-mean ab within 3 units max and 0.5 mean of fp32
    (ab spans about +-110; measured here: 0.8 max, 0.17 mean), full network, random weights
    with the logit spread of a trained model (std about 1 across bins)."""
    model = spread_logits_model(tmp_path / "w.pth").to(memory_format=torch.channels_last)
    rgb = photo_rgb("astronaut", size=INFER_PX).copy()
    _, l_small = colorize.network_input(torch.from_numpy(rgb).permute(2, 0, 1)[None] / 255.0, 64)
    cpu = torch.device("cpu")
    fp32 = colorize.predict_ab(model, l_small, 0.38, Precision(cpu, None, "test"))
    bf16 = colorize.predict_ab(model, l_small, 0.38, Precision(cpu, torch.bfloat16, "test"))
    assert bf16.dtype == torch.float32 and fp32.std() > 3  # colours, not all grey
    difference = (bf16 - fp32).abs()
    assert 0 < difference.max() < 3.0 and difference.mean() < 0.5, difference.max()


def spread_logits_model(path) -> ColorizationNet:
    """`released_format_model` with the logit spread of a trained model (std about 1 across
    bins; random init gives near-constant logits), saved as the authors' state dict."""
    model = released_format_model(path)
    with torch.no_grad():
        model.model8[6].weight.mul_(30.0)
        model.model8[6].bias.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(2))
    torch.save(model.state_dict(), path)
    return model


def test_int8_job_checks_the_model_then_colorizes_near_fp32(tmp_path, capsys) -> None:
    """dtype int8: the job measures the model's int8 colours against fp32 on the calibration
    photos and prints it, colorizes with it (pixels within 3 levels of the fp32 job's here),
    and names int8 in each file's provenance."""
    spread_logits_model(tmp_path / "w.pth")
    (tmp_path / "in").mkdir()
    Image.fromarray(gray((48, 64), "chelsea")).save(tmp_path / "in" / "cat.png")
    outputs = {}
    for dtype in ("fp32", "int8"):
        cfg = config(str(tmp_path / "in" / "cat.png"), str(tmp_path / dtype),
                     str(tmp_path / "w.pth"), dtype=dtype)  # fmt: skip
        assert colorize.main(cfg).outputs == 1
        outputs[dtype] = Image.open(tmp_path / dtype / "cat.png")
    assert re.search(
        r"int8 moves the colours of the calibration photos by mean \d", capsys.readouterr().out
    )
    fp32, int8 = (np.asarray(outputs[d], np.int16) for d in ("fp32", "int8"))
    assert fp32.std(axis=2).mean() > 2  # colours, not grey
    assert 0 < np.abs(int8 - fp32).max() <= 3, np.abs(int8 - fp32).max()
    assert outputs["int8"].text["Software"].endswith("; int8")
    assert "int8" not in outputs["fp32"].text["Software"]


def test_int8_through_ray_data_runs_the_network_the_driver_checked(tmp_path, ray_session) -> None:
    """The model actors build the driver's int8 network (its plan through Ray): a folder's
    outputs equal, pixel for pixel, what the in-process path gives the same file."""
    spread_logits_model(tmp_path / "w.pth")
    (tmp_path / "in").mkdir()
    for name in ("chelsea", "coffee"):
        Image.fromarray(gray((40, 56), name)).save(tmp_path / "in" / f"{name}.png")
    weights = str(tmp_path / "w.pth")
    folder = colorize.main(
        config(str(tmp_path / "in"), str(tmp_path / "ray"), weights, dtype="int8")
    )
    alone = colorize.main(config(str(tmp_path / "in" / "chelsea.png"), str(tmp_path / "alone"),
                                 weights, dtype="int8"))  # fmt: skip
    assert (folder.outputs, alone.outputs) == (2, 1)
    via_ray = np.asarray(Image.open(tmp_path / "ray" / "chelsea.png"))
    assert np.array_equal(via_ray, np.asarray(Image.open(tmp_path / "alone" / "chelsea.png")))
    assert via_ray.std(axis=2).mean() > 2  # colours, not grey


def test_int8_beyond_its_tolerance_is_refused_before_any_work(tmp_path) -> None:
    spread_logits_model(tmp_path / "w.pth")
    (tmp_path / "in").mkdir()
    Image.fromarray(gray((48, 64))).save(tmp_path / "in" / "a.png")
    cfg = config(str(tmp_path / "in"), str(tmp_path / "out"), str(tmp_path / "w.pth"),
                 dtype="int8", int8_max_ab_error=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match=r"int8 moves this model's colours by [\d.]+ ab units"):
        colorize.main(cfg)
    assert not (tmp_path / "out").exists()


def test_int8_model_actors_build_the_drivers_network(tmp_path, monkeypatch) -> None:
    """Actors handed the driver's plan build the int8 network it checked, float parts'
    dtype included, without calibrating again; without it they check one themselves; and an
    actor whose model file changed since the driver hashed it refuses to run."""
    torch.manual_seed(4)
    model = ColorizationNet(ModelConfig(width=1 / 16)).eval()
    cfg = config("/in", "/out", "m", dtype="int8")
    checked = colorize.check_int8(copy.deepcopy(model), cfg)
    plan = checked.plan
    assert plan.input_ranges == checked.input_ranges and len(plan.input_ranges) == 22
    alone = colorize.Colorizer(cfg, copy.deepcopy(model))

    def no_calibration(*args, **kwargs):
        raise AssertionError("an actor handed a plan calibrated again")

    monkeypatch.setattr(colorcore.int8, "quantize", no_calibration)
    handed = colorize.Colorizer(cfg, copy.deepcopy(model), plan)
    assert handed.model.input_ranges == alone.model.input_ranges == checked.input_ranges
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(5)) * 100
    assert torch.equal(handed.forward(x), checked(x)) and torch.equal(alone.forward(x), checked(x))
    for float_dtype in (None, torch.bfloat16):  # the driver's choice, not this CPU's
        other = dataclasses.replace(plan, float_dtype=float_dtype)
        assert colorize.Colorizer(cfg, copy.deepcopy(model), other).model.float_dtype == float_dtype
    monkeypatch.undo()
    strict = dataclasses.replace(cfg, int8_max_ab_error=1e-9)
    with pytest.raises(ValueError, match="more than --int8-max-ab-error"):
        colorize.Colorizer(strict, copy.deepcopy(model))

    released_format_model(tmp_path / "w.pth")
    file_cfg = dataclasses.replace(cfg, model=str(tmp_path / "w.pth"), dtype="fp32")
    with pytest.raises(RuntimeError, match="changed since the job started"):
        colorize.Colorizer(file_cfg, model_sha256="0" * 64)


def test_reassembly_in_bands_of_rows_equals_the_whole_image() -> None:
    """The CPU path converts a band of rows at a time (bounded memory for any image size):
    the pixels of the whole image's conversion, up to a rare flip of the last rounding (the
    separable upsampling rounds its floats apart from the whole one's; how often that moves a
    pixel's step depends on the CPU's kernels, and 16-bit steps are 257 times finer)."""
    g = torch.Generator().manual_seed(7)
    l_11HW = torch.rand(1, 1, 37, 53, generator=g) * 100
    ab_12ss = (torch.rand(1, 2, 16, 16, generator=g) - 0.5) * 160  # much out of gamut
    whole = colorize.reassemble(l_11HW, ab_12ss)[0].permute(1, 2, 0).numpy()
    for bits, top, flips in ((8, 255, 1e-3), (16, 65535, 1e-2)):
        expected = (whole * top).round()
        for band_px in (1, 53 * 5, 53 * 37, 10**6):  # a row, 5 rows (37 = 7 x 5 + 2), all
            pixels = colorize.reassemble_pixels(l_11HW, ab_12ss, bits, band_px=band_px)
            assert pixels.dtype == (np.uint8 if bits == 8 else np.uint16)
            difference = np.abs(pixels - expected)
            assert difference.max() <= 1 and (difference > 0).mean() < flips, (bits, band_px)


def test_output_formats_and_names() -> None:
    page8 = picture_files.Page(torch.zeros(1, 1, 2, 2), None, 8)
    page16 = dataclasses.replace(page8, bits=16)
    alpha = dataclasses.replace(page8, alpha=np.zeros((2, 2), np.uint8))
    meta = picture_files.Metadata()
    fmt = picture_files.output_format
    assert fmt(picture_files.Decoded([page8], "JPEG", meta), "keep") == "JPEG"
    assert fmt(picture_files.Decoded([page16], "TIFF", meta), "keep") == "TIFF16"
    assert fmt(picture_files.Decoded([page16], "JPEG", meta), "png") == "PNG16"
    assert fmt(picture_files.Decoded([alpha], "PNG", meta), "jpeg") == "PNG"
    assert fmt(picture_files.Decoded([page8, page8], "TIFF", meta), "png") == "TIFF"
    assert fmt(picture_files.Decoded([page8, page16], "TIFF", meta), "keep") == "TIFF16"
    assert fmt(picture_files.Decoded([page8], "BMP", meta), "keep") == "PNG"
    for source, choice, expected in (
        ("GIF", "keep", "PNG"),
        ("WEBP", "keep", "WEBP"),
        ("PNG", "webp", "WEBP"),
        ("WEBP", "jpeg", "TIFF16"),
    ):
        frames = picture_files.Decoded([page8, page16], source, meta, frame_ms=[40, 40])
        assert fmt(frames, choice) == expected  # an animation at 8 bits, or pages
    assert picture_files.output_name("a/b.TIF", "PNG16") == "a/b.TIF.png"
    assert picture_files.output_name("a/b.tif", "TIFF16") == "a/b.tif"
    assert picture_files.output_name("a/b.jpeg", "JPEG") == "a/b.jpeg"


def _jpeg_corpus() -> dict[str, bytes]:
    colour = photo_rgb("chelsea", size=40)
    truncated = encode(gray((64, 48)))
    broken = bytearray(encode(gray((40, 40))))
    tables = broken.index(b"\xff\xc4")  # garbled Huffman tables: the header still reads
    broken[tables + 5 : tables + 21] = b"\xff" * 16
    return {
        "meta.jpg": jpeg_with_metadata(),
        "gray.jpg": encode(gray((30, 44))),
        "colour.jpg": encode(colour),
        "same/size.jpg": encode(gray((30, 44), "astronaut")),
        "cmyk.jpg": save(Image.fromarray(gray((20, 20))).convert("CMYK"), "JPEG"),
        "truncated.jpg": truncated[: len(truncated) // 2],
        "scan.png": encode(gray((16, 16)), "PNG"),
        "broken.jpg": bytes(broken),
        "dot_gain.jpg": save(Image.fromarray(gray((30, 44))), "JPEG", icc_profile=GRAY_18),
        "adobe.jpg": save(Image.fromarray(colour), "JPEG", icc_profile=ADOBE_RGB),
        "scanner.jpg": save(Image.fromarray(colour), "JPEG", icc_profile=input_only()),
    }


def _run_local(files: dict[str, bytes], root, model, **kw) -> dict[str, dict]:
    """The job's stages in this process (read, prepare, model, write), as for one image."""
    for rel, data in files.items():
        (root / "in" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "in" / rel).write_bytes(data)
    out = root / f"out-{kw['jpeg_path']}"
    cfg = config(str(root / "in"), str(out), str(root / "model.pt"), dtype="fp32", **kw)
    provenance = colorize._provenance("f" * 64, cfg)
    units, _, _ = colorize.plan(cfg, [])
    colorize._run_in_process(units, cfg, model, provenance)
    rows = colorize_manifest.read(cfg.output, cfg.s3).to_pylist()
    return {r["source"][len(str(root / "in")) + 1 :]: r | {"root": out} for r in rows}


def test_a_batch_of_large_scans_is_colorized_a_few_at_a_time(tmp_path, monkeypatch) -> None:
    """The fused stage holds a bounded number of full-size pixels (each image's L waits for
    the network): past the bound, the rows so far are colorized and written, each group with
    its manifest part, and the rest follow; every input comes out as with one group."""
    torch.manual_seed(4)
    model = ColorizationNet(ModelConfig(width=1 / 16)).eval()
    files = {f"scan{i}.png": encode(gray((48, 64)), "PNG") for i in range(5)}
    whole = _run_local(files, tmp_path / "whole", model, jpeg_path="cpu")
    monkeypatch.setattr(colorize, "WHOLE_STAGE_PIXELS", 2 * 48 * 64)
    grouped = _run_local(files, tmp_path / "grouped", model, jpeg_path="cpu")
    parts = colorize_manifest.list_parts(str(tmp_path / "grouped" / "out-cpu"), None)
    assert len(parts) == 3  # 2 + 2 + 1 scans
    # What the stage hands the driver: every row once, each with its own part's name and size
    cfg = config(str(tmp_path / "whole" / "in"), str(tmp_path / "direct"), "m.pt", dtype="fp32")
    provenance = colorize._provenance("f" * 64, cfg)
    units, _, _ = colorize.plan(cfg, [])
    rows = [r for u in units for r in colorize.read_unit({"unit": json.dumps(u)}, cfg)]
    out = colorize.WholeStage(cfg, provenance, model)(colorize._as_batch(rows))
    assert sorted(out["source"]) == sorted(r["source"] for r in rows)
    sizes = Counter(out["part"])
    assert sorted(sizes.values()) == [1, 2, 2]
    assert all(out["part_rows"][i] == sizes[out["part"][i]] for i in range(len(rows)))
    assert sorted(grouped) == sorted(whole) == sorted(files)
    for rel in files:
        assert grouped[rel]["status"] == whole[rel]["status"] == "ok"
        a, b = (np.asarray(Image.open(r["root"] / r["output"])) for r in (whole[rel], grouped[rel]))
        assert np.abs(a.astype(int) - b).max() <= 1


def test_jpegs_on_the_model_device_match_the_cpu_path(tmp_path) -> None:
    """The device path (nvJPEG on GPUs; Pillow as its codec here) gives the CPU path's
    result: same accounting, same sizes and metadata, pixels within JPEG rounding, a gray
    picture's levels read through its gray profile and an Adobe RGB one's colours through
    its curves, there and back, too; CMYK, a scanner's table profile, non-JPEG and
    undecodable files go the CPU way and are colorized or recorded as before."""
    torch.manual_seed(3)
    model = ColorizationNet(ModelConfig(width=1 / 16)).eval()
    files = _jpeg_corpus()
    (tmp_path / "in").mkdir()
    cfg = config("in", "out", "m", jpeg_path="device")
    routes = {rel: colorize.prepare_row(colorize._row(rel, rel, data), cfg)["route"]
              for rel, data in files.items()}  # fmt: skip
    assert routes == {"meta.jpg": "device", "gray.jpg": "device", "colour.jpg": "device",
                      "same/size.jpg": "device", "cmyk.jpg": "cpu", "truncated.jpg": "cpu",
                      "broken.jpg": "device", "scan.png": "cpu", "dot_gain.jpg": "device",
                      "adobe.jpg": "device", "scanner.jpg": "cpu"}  # fmt: skip
    on_device = _run_local(files, tmp_path, model, jpeg_path="device")
    on_cpu = _run_local(files, tmp_path, model, jpeg_path="cpu")
    assert set(on_device) == set(on_cpu) == set(files)
    for rel, row in on_device.items():
        other = on_cpu[rel]
        assert (row["status"], row["output"]) == (other["status"], other["output"]), rel
        assert (row["width_px"], row["height_px"]) == (other["width_px"], other["height_px"])
    assert on_device["truncated.jpg"]["status"] == "error"
    assert "truncated" in on_device["truncated.jpg"]["reason"]
    # The codec failed on it in the batch: the CPU path took it over and recorded why.
    assert on_device["broken.jpg"]["status"] == "error"
    assert on_device["broken.jpg"]["reason"] == on_cpu["broken.jpg"]["reason"] != ""
    for rel in ("meta.jpg", "gray.jpg", "colour.jpg", "same/size.jpg", "dot_gain.jpg",
                "adobe.jpg"):  # fmt: skip
        device_image = Image.open(on_device[rel]["root"] / rel)
        cpu_image = Image.open(on_cpu[rel]["root"] / rel)
        assert device_image.size == cpu_image.size and device_image.format == "JPEG"
        a, b = (np.asarray(i.convert("RGB"), np.float32) for i in (device_image, cpu_image))
        assert np.abs(a - b).mean() < 1.0 and np.abs(a - b).max() <= 12, rel
        assert np.abs(a - a.mean(axis=2, keepdims=True)).max() > 2  # colour was added
    meta = Image.open(on_device["meta.jpg"]["root"] / "meta.jpg")
    exif = meta.getexif()
    assert meta.size == (24, 40) and 0x0112 not in exif and exif[0x013B] == "A. Archivist"
    assert exif.get_ifd(0x8769)[0x9003] == "1931:05:01 12:00:00"
    assert "f" * 64 in exif[picture_files.PROVENANCE_EXIF_TAG]
    assert meta.info["icc_profile"] == SRGB_ICC and b"archive-42" in meta.info["xmp"]
    assert meta.info["photoshop"][0x0404] == IPTC
    adobe = Image.open(on_device["adobe.jpg"]["root"] / "adobe.jpg")
    assert adobe.info["icc_profile"] == ADOBE_RGB


def test_the_device_path_converts_profiled_pictures_as_the_cpu_path_does() -> None:
    """Gray and Adobe RGB JPEGs, dark ones (where Adobe RGB's pure power curve is steepest),
    through the device path with a lossless encoder: the pixels before encoding are the CPU
    path's to within one level (the output converted back from full precision, as there)."""
    from jobs import icc
    from jobs.colorize_jpeg import Codec, JpegColorizer, pil_codec
    from jobs.images import as_8bit

    torch.manual_seed(6)
    model = ColorizationNet(ModelConfig(width=1 / 16)).eval()
    cpu = Precision(torch.device("cpu"), None, "test")
    dark = (photo_rgb("astronaut", 48).astype(np.float64) / 255) ** 3 * 255
    pictures = [(np.uint8(dark), ADOBE_RGB), (np.uint8(dark[..., 1]), GRAY_18)]
    files = [save(Image.fromarray(p), "JPEG", quality=95, icc_profile=q) for p, q in pictures]
    lossless = Codec(pil_codec(cpu.device).decode,
                     lambda images, quality: [encode(i.permute(1, 2, 0).numpy(), "PNG")
                                              for i in images])  # fmt: skip
    colorizer = JpegColorizer(model, cpu, infer_px=INFER_PX, temperature=0.38, quality=95,
                              codec=lossless)  # fmt: skip
    outputs = colorizer(files, [b""] * 2, [1, 1], [q for _, q in pictures])
    for data, (_, profile), out in zip(files, pictures, outputs, strict=True):
        decoded = picture_files.decode(data, 10**6)
        l_full, l_small = colorize.network_input(decoded.pages[0].rgb, INFER_PX)
        ab = colorize.predict_ab(model, l_small, 0.38, cpu)
        pixels = colorize.reassemble_pixels(l_full, ab, 16)
        expected = as_8bit(icc.from_srgb(pixels, picture_files.page_profile(Image.open(
            io.BytesIO(data)))))  # fmt: skip
        got = np.asarray(Image.open(io.BytesIO(out)))
        assert np.abs(got.astype(int) - expected).max() <= 1, profile[:40]


def test_device_path_in_pieces_gives_the_whole_batch_result() -> None:
    """A batch colorized in pipelined pieces, or with its full-size steps split by a pixel
    budget (Pillow as the codec here): every file's output at its place, failures where they
    were, pixels as when the batch goes through whole."""
    from jobs.colorize_jpeg import JpegColorizer, _pieces, pil_codec
    from jobs.images import exif_orientation

    assert _pieces(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert _pieces(2, 4) == [[0], [1]] and _pieces(0, 4) == []
    torch.manual_seed(5)
    model = ColorizationNet(ModelConfig(width=1 / 16)).eval()
    corpus = _jpeg_corpus()
    names = ["meta.jpg", "broken.jpg", "gray.jpg", "colour.jpg", "same/size.jpg"]
    files = [corpus[n] for n in names] + [encode(gray((20 + i, 30 - i))) for i in range(4)]
    turns = [exif_orientation(Image.open(io.BytesIO(f))) for f in files]
    cpu = Precision(torch.device("cpu"), None, "test")
    kwargs = {
        "infer_px": INFER_PX,
        "temperature": 0.38,
        "quality": 95,
        "codec": pil_codec(cpu.device),
    }
    whole = JpegColorizer(model, cpu, chunks=1, **kwargs)(files, [b""] * len(files), turns)
    pieces = JpegColorizer(model, cpu, chunks=4, **kwargs)(files, [b""] * len(files), turns)
    # and with the full-size steps one image at a time (two files share a size)
    single = JpegColorizer(model, cpu, chunks=1, group_px=1, **kwargs)
    for other in (pieces, single(files, [b""] * len(files), turns)):
        assert [out is None for out in other] == [n == "broken.jpg" for n in names] + [False] * 4
        for source, a, b in zip(files, whole, other, strict=True):
            if a is None:
                continue
            x, y = (np.asarray(Image.open(io.BytesIO(d)), np.float32) for d in (a, b))
            expected = ImageOps.exif_transpose(Image.open(io.BytesIO(source))).size
            assert Image.open(io.BytesIO(b)).size == expected and np.abs(x - y).max() <= 2

    # The images of at most 610 pixels encoded on CPU threads (libjpeg-turbo through OpenCV,
    # as Pillow's), the rest by the codec: the same pictures.
    codec_got = []

    def recording_encode(images: list[torch.Tensor], quality: int) -> list[bytes]:
        codec_got.extend(image.shape[-2] * image.shape[-1] for image in images)
        return kwargs["codec"].encode(images, quality)

    recording = dataclasses.replace(kwargs["codec"], encode=recording_encode)
    threaded = JpegColorizer(model, cpu, chunks=4, encode_threads=2, cpu_encode_max_px=610,
                             **(kwargs | {"codec": recording}))  # fmt: skip
    for a, b in zip(pieces, threaded(files, [b""] * len(files), turns), strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            x, y = (np.asarray(Image.open(io.BytesIO(d)), np.int16) for d in (a, b))
            assert x.shape == y.shape and np.abs(x - y).max() <= 1
    decoded = [Image.open(io.BytesIO(a)).size for a in pieces if a is not None]
    assert sorted(codec_got) == sorted(w * h for w, h in decoded if w * h > 610)
    assert sum(w * h <= 610 for w, h in decoded) == 2  # 20 x 30 and 21 x 29: on the threads
    with pytest.raises(ValueError, match="encode_threads >= 0"):
        JpegColorizer(model, cpu, encode_threads=-1, **kwargs)

    # An encoder that fails on one image (27 px wide) fails that file alone: None, for the
    # CPU path to take over, and the rest of its piece is encoded file by file.
    def failing_encode(images: list[torch.Tensor], quality: int) -> list[bytes]:
        if any(image.shape[-1] == 27 for image in images):
            raise RuntimeError("encoder failure")
        return kwargs["codec"].encode(images, quality)

    failing = dataclasses.replace(kwargs["codec"], encode=failing_encode)
    colorizer = JpegColorizer(model, cpu, chunks=4, **(kwargs | {"codec": failing}))
    partial = colorizer(files, [b""] * len(files), turns)
    sizes = [Image.open(io.BytesIO(f)).size for f in files]  # stored; shown turned for 5-8
    widths = [h if turn > 4 else w for (w, h), turn in zip(sizes, turns, strict=True)]
    assert widths.count(27) == 1
    assert [out is None for out in partial] == [
        a is None or w == 27 for a, w in zip(pieces, widths, strict=True)
    ]
    assert [out for out, w in zip(partial, widths, strict=True) if w != 27] == [
        out for out, w in zip(pieces, widths, strict=True) if w != 27
    ]


def test_cpu_encode_pieces_deals_whole_pieces_to_the_threads_beside_the_codec() -> None:
    """With cpu_encode_pieces 0.5 every other piece is the CPU threads' whole, encoded while
    the codec encodes the piece before: each encoder here waits at a barrier for the other,
    which only encoders at work at once pass. The pictures are those of the codec alone."""
    import threading

    from jobs.colorize_jpeg import JpegColorizer, pil_codec

    torch.manual_seed(5)
    model = ColorizationNet(ModelConfig(width=1 / 16)).eval()
    cpu = Precision(torch.device("cpu"), None, "test")
    files = [encode(gray((20 + i, 30 - i))) for i in range(8)]
    codec = pil_codec(cpu.device)
    kwargs = {"infer_px": INFER_PX, "temperature": 0.38, "quality": 95, "chunks": 4}
    alone = JpegColorizer(model, cpu, codec=codec, **kwargs)(files, [b""] * 8)
    together = threading.Barrier(2, timeout=60)  # (this process may wait long for a core)
    got: dict[str, list[int]] = {"codec": [], "cpu": []}

    def meeting(name: str, encode):
        def encode_there(images: list[torch.Tensor], quality: int) -> list[bytes]:
            got[name] += [image.shape[-1] for image in images]
            together.wait()
            return encode(images, quality)

        return encode_there

    colorizer = JpegColorizer(
        model, cpu, codec=dataclasses.replace(codec, encode=meeting("codec", codec.encode)),
        encode_threads=2, cpu_encode_max_px=0, cpu_encode_pieces=0.5, **kwargs,
    )  # fmt: skip
    colorizer.cpu_encode = meeting("cpu", colorizer.cpu_encode)
    dealt = colorizer(files, [b""] * 8)
    widths = [Image.open(io.BytesIO(f)).size[0] for f in files]
    assert got == {"codec": widths[0:2] + widths[4:6], "cpu": widths[2:4] + widths[6:8]}
    for a, b in zip(alone, dealt, strict=True):
        x, y = (np.asarray(Image.open(io.BytesIO(d)), np.int16) for d in (a, b))
        assert x.shape == y.shape and np.abs(x - y).max() <= 1
    for share, threads in ((1.5, 2), (0.5, 0)):
        with pytest.raises(ValueError, match="cpu_encode_pieces must lie in"):
            JpegColorizer(model, cpu, encode_threads=threads, cpu_encode_pieces=share, **kwargs)


@pytest.mark.parametrize("turn", range(1, 9))
def test_exif_orientation_on_the_device_path_equals_pillows(turn: int) -> None:
    from PIL import ImageOps

    from jobs.images import exif_orientation
    from jobs.picture_files import upright

    pixels = np.random.default_rng(turn).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = turn
    stored = Image.open(io.BytesIO(save(Image.fromarray(pixels), "PNG", exif=exif.tobytes())))
    assert exif_orientation(stored) == turn
    expected = np.asarray(ImageOps.exif_transpose(stored))
    got = upright(torch.from_numpy(pixels).permute(2, 0, 1), turn).permute(1, 2, 0).numpy()
    assert np.array_equal(got, expected)


def test_app_segments_split_large_icc_profiles_and_keep_jfif_first() -> None:
    from jobs.picture_files import app_segments, with_segments

    icc = bytes(range(256)) * 600  # 153,600 bytes: three APP2 chunks
    segments = app_segments(b"", icc=icc, xmp=None, iptc=None)
    plain = encode(gray((8, 8)))
    image = Image.open(io.BytesIO(with_segments(plain, segments)))
    assert image.info["icc_profile"] == icc and "jfif" in image.info
    assert segments.count(b"ICC_PROFILE\x00") == 3
    with pytest.raises(ValueError, match="SOI"):
        with_segments(b"GIF89a", segments)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvjpeg_path_matches_the_pillow_codec() -> None:
    from jobs.colorize_jpeg import JpegColorizer, pil_codec
    from jobs.images import exif_orientation

    torch.manual_seed(4)
    model = ColorizationNet(ModelConfig(width=1 / 4)).eval().cuda()
    corpus = _jpeg_corpus()  # the files the device path takes and can decode
    files = [corpus[n] for n in ("meta.jpg", "gray.jpg", "colour.jpg", "same/size.jpg")]
    cuda = Precision(torch.device("cuda"), torch.bfloat16, "test")
    kwargs = {"infer_px": INFER_PX, "temperature": 0.38, "quality": 95}
    turns = [exif_orientation(Image.open(io.BytesIO(f))) for f in files]
    assert turns == [6, 1, 1, 1]
    nv = JpegColorizer(model, cuda, **kwargs)(files, [b""] * len(files), turns)
    pil = JpegColorizer(model, cuda, codec=pil_codec(cuda.device), **kwargs)(
        files, [b""] * len(files), turns
    )
    threaded = JpegColorizer(model, cuda, chunks=1, encode_threads=2, **kwargs)(
        files, [b""] * len(files), turns
    )
    for a, b, c in zip(nv, pil, threaded, strict=True):
        x, y, z = (np.asarray(Image.open(io.BytesIO(d)).convert("RGB"), np.float32)
                   for d in (a, b, c))  # fmt: skip
        assert x.shape == y.shape == z.shape
        assert np.abs(x - y).mean() < 3.0 and np.abs(x - z).mean() < 3.0
    assert Image.open(io.BytesIO(nv[0])).size == (24, 40)  # upright
