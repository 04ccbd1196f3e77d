"""Colorize photo archives at full resolution on Ray Data: resumable, every input accounted for.

``python -m jobs.colorize INPUT OUTPUT --model URL [--temperature 0.38] [options]``

INPUT (local path or storage URL) is one image, a folder (recursive), a tar (``.tar``,
``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``) or zip archive, or a Parquet file of image
bytes; a folder may hold any mix of these. Archive members and Parquet rows are inputs of their
own. OUTPUT mirrors INPUT: ``a/b.jpg`` -> ``OUTPUT/a/b.jpg``; member ``m.png`` of ``x/y.tar`` ->
``OUTPUT/x/y.tar/m.png``; row ``key`` of ``p.parquet`` -> ``OUTPUT/p.parquet/key.<ext>``. When
the output format differs from what the name says, its extension is appended (``a.gif.png``).

Per image: EXIF orientation applied (and the tag removed), the network sees L resized to
``--infer-px`` square, the annealed-mean ab (T = ``--temperature``) is upsampled bilinearly to
the full size and joined with the image's own L, and out-of-gamut colours lose chroma, never
L. Format kept (``--format`` to choose; a format unknown to this job becomes PNG), a 16-bit
picture gives a 16-bit PNG or TIFF, alpha is kept, ICC profiles are honoured (a picture in
another space is read into sRGB and an RGB one's output converted back into its profile,
`jobs.icc`), EXIF / XMP are copied (IPTC into JPEG and TIFF, which have a place for it),
and a provenance string (this project, the model file's SHA-256, T) goes into EXIF tag
0x000B (ProcessingSoftware) and the manifest. Multi-page TIFFs give multi-page TIFFs, at 16
bits when a page has 16; animations (GIF, APNG, WebP) give animations, each frame colorized.
The files themselves: `jobs.picture_files`.

Pipeline: read tasks (files, archive members, Parquet rows) -> decode tasks (network-size L;
of a JPEG bound for the GPU only its header and metadata) -> model actors (GPU when present,
batched, bf16 autocast where fast; JPEGs decoded, colorized and encoded on the GPU,
`jobs.colorize_jpeg`) -> encode-and-write tasks; on CPUs the model actors decode, encode and
write their batches themselves (`WholeStage`). Every write writes its outputs, then a manifest
part with one row per input (source, output, status, reason, time), which the driver folds
into a few larger parts as the job goes (`jobs.colorize_manifest`); a re-run of the same
command reads the parts and skips inputs already done, so a killed run resumes and each input
ends up exactly once. An archive read to its end also leaves a row of its own (status
``read``, not an input) that lets a re-run skip it unopened; one whose reading a storage
error breaks off is opened again and read on (`read_unit`). A large zip or Parquet file is
read by several tasks at once, in parts the driver splits it into (`split_archive`).
Bad inputs (empty, truncated, not images, above ``--max-pixels``, archive members whose paths
leave OUTPUT, unreadable archives) become manifest rows with a reason and never stop the job;
so does an input that kills the process working on it, after ``--crash-tries`` deaths
(`jobs.crashes`: Ray itself would try it again for ever).
At the end ``inputs = outputs + errors`` is printed and checked against the written files, and
the manifest is written to ``OUTPUT/_colorize/manifest.parquet`` (or ``.csv``).

One local image runs in-process, without starting Ray, through the same functions.

Legend: N batch, P pages, H, W full size, S network input side, s = S / 4 network output side.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import gzip
import io
import json
import logging
import os
import posixpath
import re
import stat
import sys
import tarfile
import time
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from colorcore.color import lab_to_rgb, rgb_to_lightness
from colorcore.decode import ANNEALED_MEAN_T, INFER_PX, annealed_mean, temperature_problem
from colorcore.int8 import Int8ColorizationNet, Int8Plan
from jobs import colorize_manifest as manifest
from jobs import icc, storage, tars
from jobs.colorize_manifest import WORK_DIR
from jobs.crashes import CrashGuard
from jobs.images import (
    DEFAULT_MAX_PIXELS,
    JPEG_QUALITY,
    BadImage,
    exif_orientation,
    open_image,
    out_of_memory,
)
from jobs.picture_files import (
    EXIF_SEGMENT_MAX,
    SUFFIXES,
    Decoded,
    app_segments,
    decode,
    encode,
    exif_bytes,
    output_format,
    output_name,
    page_profile,
    read_metadata,
)
from jobs.runtime import Precision, choose_precision, keep_freed_memory

OUT_OF_MEMORY = "ran out of memory here"  # an error row's reason that a re-run tries again
MEMBER_SEP = "!"  # source of an archive member: <archive URL>!<member name>
ROW_SEP = "#"  # source of a Parquet row: <file URL>#<key>
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
REASSEMBLY_BAND_PX = 1 << 18  # pixels through the CPU path's Lab steps at a time
WHOLE_STAGE_PIXELS = 1 << 26  # full-size pixels (4 bytes each) a fused stage holds at once
PARQUET_KEY_COLUMNS = ("path", "key", "name", "filename", "id")
PARQUET_KEY_BYTES = 4096  # a row's name at most, on average (PATH_MAX)
PARQUET_BATCH_BYTES = 256 * 2**20  # of images decompressed at a time, as the file declares
TAR_NOT_FILE = tars.NOT_A_FILE
ZIP_NOT_FILE = "archive member is not a regular file (link)"
READ_BLOCK_BYTES = 2 << 20  # of input files a block of rows holds: about a batch of scans
INDEX_REREADS = 0.05  # of a split archive's size, at most, read again as its parts' indexes
INDEX_REREADS_FLOOR = 1 << 26  # bytes of index re-reads allowed whatever the archive's size
ZIP_ENTRY_BYTES = 46  # fixed part of a zip central-directory entry (APPNOTE 4.3.12)
ZIP_LOCAL_HEADER_BYTES = 30  # fixed part of a zip member's local header (APPNOTE 4.3.7)
MEMBER_SLACK_BYTES = 1024  # a member's local header or a row's key, beside its data
ARCHIVE_READ_ATTEMPTS = 3  # readings of an archive that storage errors break off
ARCHIVE_RETRY_DELAY_S = 2.0  # times the attempt number, before reading on
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ColorizeConfig:
    input: str = ""
    """One image, a folder, a tar / zip archive or a Parquet file (local path or URL)."""
    output: str = ""
    """Output folder (mirrors INPUT); neither INPUT nor inside it, nor a folder around it."""
    model: str = ""
    """Released ECCV16 weights, a project checkpoint, a training run folder or a
    model.safetensors export (URL)."""
    temperature: float = ANNEALED_MEAN_T
    """Annealed-mean temperature T (paper: 0.38; 1 = mean, -> 0 = mode)."""
    infer_px: int = INFER_PX
    """The network sees L resized to this square (released demo: 256)."""
    format: Literal["keep", "jpeg", "png", "tiff", "webp"] = "keep"
    """Output format: the input's (keep) or one for every output."""
    quality: int = JPEG_QUALITY
    """JPEG and WebP quality."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more pixels are refused (decompression bombs): a TIFF's pages or an
    animation's frames together, each after the first counted as at least the network's
    input (`infer_px` squared), so that a file of a hundred thousand 1x1 frames is one too."""
    max_file_mb: float = 1024.0
    """Files and archive members larger than this are refused."""
    manifest_format: Literal["parquet", "csv"] = "parquet"
    """Format of OUTPUT/_colorize/manifest.*."""
    retry_errors: bool = False
    """On a re-run, try again the inputs that failed (default: skip them as done)."""
    parquet_column: str | None = None
    """Parquet input: the column of image bytes (default: the first binary column)."""
    parquet_key_column: str | None = None
    """Parquet input: the column naming each row's output (default: path/key/name, else the
    row number)."""
    batch_size: int = 0
    """Images per model batch (0: 8 on CPUs, 64 per GPU, which the device JPEG path splits
    into pipelined pieces)."""
    files_per_task: int = 32
    """Folder inputs: files per read task."""
    archive_part_mb: float = 512.0
    """Zip and Parquet inputs larger than this are read by several tasks at once, each about
    this many MB of members (a tar, which has no index, is read by one)."""
    model_actors: int = 0
    """Model actors (0: one per GPU; on CPUs, where they decode and encode too, as many as
    half the CPUs hold: one per core at the default actor_cpus)."""
    actor_cpus: float = 0.5
    """CPUs per model actor (its torch threads: this rounded, at least 1)."""
    task_cpus: float = 0.5
    """CPUs per read, decode and write task."""
    device: str = "auto"
    """Model device: auto (CUDA when the cluster has GPUs at the start), cpu or cuda (GPU
    actors, model_actors of them or one per GPU, which an autoscaling cluster starts GPU
    nodes for)."""
    accelerator_type: str | None = None
    """GPU model the model actors run on, as Ray names it (L40S, H100, A10G, ...): on a
    cluster of several GPU node types, nodes of that type only (default: any GPU)."""
    dtype: Literal["auto", "bf16", "fp32", "int8"] = "auto"
    """Autocast dtype: auto (bf16 where the device has fast bf16), bf16 or fp32; or int8,
    CPU inference with the convs but the last in int8 (`colorcore.int8`: 1.9x the bf16
    network on CPUs with VNNI but no AMX), checked against fp32 before the job starts."""
    int8_max_ab_error: float = 1.0
    """With dtype int8: the largest mean distance in ab (Lab units) int8 may put between this
    model's colours and fp32's on the calibration photos; above it the job refuses to start.
    Just noticeable is about 2."""
    jpeg_path: Literal["auto", "device", "cpu"] = "auto"
    """Where JPEGs are decoded and encoded: on the model's device (nvJPEG, see
    `jobs.colorize_jpeg`), on CPUs, or auto (the device when the model runs on a GPU)."""
    encode_threads: int | None = None
    """Device JPEG path: CPU threads per model actor that encode the colorized images of up
    to about 0.5 MP (libjpeg-turbo, after one copy to the host; `jobs.colorize_jpeg`), which
    frees the GPU for the network; nvJPEG encodes the larger ones. Default: on GPUs the
    node's CPUs per GPU, less one (0: nvJPEG for all). Ray does not count them among the
    actor's CPUs (--actor-cpus)."""
    cpu_encode_pieces: float = 0.0
    """Device JPEG path: the share of each batch's pipelined pieces whose larger images the
    encode threads take too, whole, while nvJPEG encodes another piece (0.5: every other
    piece; `jobs.colorize_jpeg.JpegColorizer`). Not measured on a GPU yet: 0 leaves the
    larger images to nvJPEG. Nothing where an actor has no encode threads."""
    stages: Literal["auto", "fused", "split"] = "auto"
    """fused: each model actor decodes, colorizes, encodes and writes its batches (best when
    the model runs on CPUs, which every stage shares); split: decode and write tasks around
    the model actors (best with GPUs); auto: fused on CPUs, split with GPUs."""
    compile: bool = False
    """torch.compile the model, and on the device JPEG path the Lab steps around it (GPU
    runs: pays off on large archives of few image sizes)."""
    crash_tries: int = 3
    """Deaths of the process working on an input alone (a decoder's crash on a malformed
    file, or Ray's memory monitor killing it) after which the input is recorded as an
    error; Ray would try it again for ever (`jobs.crashes`)."""
    s3: storage.S3Options = field(default_factory=storage.S3Options)

    def __post_init__(self) -> None:
        from jobs.config import choice_problems, cpus_problems, positive_problems

        if not self.input or not self.output or not self.model:
            raise ValueError("INPUT, OUTPUT and --model are required")
        if problems := choice_problems(self):
            raise ValueError("; ".join(problems))
        (in_scheme, in_path), (out_scheme, out_path) = map(
            storage.split_url, (self.input, self.output)
        )
        inside = _inside_local if in_scheme == "file" else _inside_by_name
        if in_scheme == out_scheme and (inside(out_path, in_path) or inside(in_path, out_path)):
            # Outputs mirror INPUT's paths below OUTPUT: around INPUT, one could be an input's
            # (one image's output in its own folder; x.jpg's of INPUT/x's x.jpg, where x is
            # INPUT's own name).
            raise ValueError(
                f"OUTPUT {self.output} and INPUT {self.input} must be apart: neither the same "
                "folder nor one inside the other"
            )
        if problem := temperature_problem(self.temperature):
            raise ValueError(problem)
        if self.infer_px < 16 or self.infer_px % 8:
            raise ValueError(f"infer_px must be a multiple of 8, >= 16, got {self.infer_px}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in [1, 100], got {self.quality}")
        if min(self.max_pixels, self.files_per_task) < 1 or self.batch_size < 0:
            raise ValueError("max_pixels and files_per_task must be >= 1, batch_size >= 0")
        problems = positive_problems(self, "max_file_mb", "archive_part_mb")
        problems += cpus_problems(self, "task_cpus", share=0.5)  # (reads ask half of it)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            problems.append(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if problems := problems + cpus_problems(self, "actor_cpus"):
            raise ValueError("; ".join(problems))
        if self.encode_threads is not None and self.encode_threads < 0:
            raise ValueError(f"encode_threads must be >= 0, got {self.encode_threads}")
        if self.encode_threads and self.jpeg_path == "cpu":
            raise ValueError(
                "encode_threads is the device JPEG path's: drop encode_threads or jpeg_path cpu"
            )
        if not 0.0 <= self.cpu_encode_pieces <= 1.0:
            raise ValueError(f"cpu_encode_pieces must lie in [0, 1], got {self.cpu_encode_pieces}")
        if self.cpu_encode_pieces and (self.encode_threads == 0 or self.jpeg_path == "cpu"):
            raise ValueError(
                "cpu_encode_pieces shares pieces with the device path's encode threads: it "
                "needs encode_threads > 0 (or its default) and jpeg_path auto or device"
            )
        if self.model_actors < 0:
            raise ValueError(f"model_actors must be >= 0, got {self.model_actors}")
        if self.crash_tries < 1:
            raise ValueError(f"crash_tries must be >= 1, got {self.crash_tries}")
        if self.accelerator_type and self.device == "cpu":
            raise ValueError("accelerator_type names a GPU: it needs device cuda (or auto)")
        if self.dtype == "int8" and (
            self.device.startswith("cuda") or self.accelerator_type or self.jpeg_path == "device"
        ):
            raise ValueError(
                "dtype int8 runs the model on CPUs: it goes with neither device cuda, nor "
                "accelerator_type, nor jpeg_path device"
            )
        if self.dtype == "int8" and self.compile:
            raise ValueError("dtype int8 runs oneDNN's kernels as they are: drop compile")
        if not self.int8_max_ab_error > 0:
            raise ValueError(f"int8_max_ab_error must be > 0, got {self.int8_max_ab_error}")
        if self.accelerator_type and not self.model_actors:
            raise ValueError(
                "accelerator_type needs model_actors, the number of such GPUs to use (the "
                "cluster's GPU count mixes every type)"
            )


# ---------------------------------------------------------------- the colour math


def _inside_by_name(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or below it, by their names."""
    return (path.rstrip("/") + "/").startswith(folder.rstrip("/") + "/")


def _inside_local(path: str, folder: str) -> bool:
    """Whether the local `path` is `folder` or below it: by name, or as the file system finds
    the folders on its way (a link to `folder`, another spelling on a file system that
    ignores case, a second mount of it)."""
    if _inside_by_name(path, folder):
        return True
    if not os.path.exists(folder):
        return False
    at = os.path.realpath(path)
    while True:
        if os.path.exists(at) and os.path.samefile(at, folder):
            return True
        if (parent := os.path.dirname(at)) == at:
            return False
        at = parent


def network_input(rgb_N3HW: torch.Tensor, infer_px: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(full-resolution L (N, 1, H, W), L resized for the network (N, 1, S, S)) of colour
    (N, 3, H, W) or gray (N, 1, H, W) images."""
    l_N1HW = rgb_to_lightness(rgb_N3HW)
    if l_N1HW.shape[-2:] == (infer_px, infer_px):  # a resize to the same size is the identity
        return l_N1HW, l_N1HW
    l_N1SS = F.interpolate(l_N1HW, size=(infer_px, infer_px), mode="bilinear", antialias=True)
    return l_N1HW, l_N1SS.clamp_(0.0, 100.0)


@torch.no_grad()
def predict_ab(
    model: torch.nn.Module, l_N1SS: torch.Tensor, temperature: float, precision: Precision
) -> torch.Tensor:
    """Annealed-mean ab at the network's output size, (N, 2, s, s) fp32 on the model's
    device."""
    device = precision.device
    x = l_N1SS.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.autocast(
        device.type,
        dtype=precision.autocast_dtype or torch.float32,
        enabled=precision.autocast_dtype is not None,
    ):
        logits_NQss = model(x)
    return annealed_mean(logits_NQss, temperature)


def reassemble(l_N1HW: torch.Tensor, ab_N2ss: torch.Tensor, gamut: str = "chroma") -> torch.Tensor:
    """Full-resolution sRGB in [0, 1]: upsampled ab joined with the image's own L (`gamut`:
    see `lab_to_rgb`; the job keeps L with "chroma")."""
    ab_N2HW = F.interpolate(ab_N2ss, size=l_N1HW.shape[-2:], mode="bilinear", align_corners=False)
    return lab_to_rgb(torch.cat([l_N1HW, ab_N2HW], dim=1), gamut=gamut)


def reassemble_pixels(
    l_11HW: torch.Tensor, ab_12ss: torch.Tensor, bits: int, band_px: int = REASSEMBLY_BAND_PX
) -> np.ndarray:
    """`reassemble` of one page as (H, W, 3) uint8 or uint16 pixels, a band of rows at a
    time: the Lab steps' memory stays bounded whatever the image's size (a 100-megapixel scan
    would otherwise hold several 1.2 GB planes at once). Bilinear upsampling is separable:
    ab is upsampled along the height once (s columns wide), then `reassemble` upsamples each
    band along the width.
    """
    H, W = l_11HW.shape[-2:]
    ab_12Hs = F.interpolate(
        ab_12ss, size=(H, ab_12ss.shape[-1]), mode="bilinear", align_corners=False
    )
    top, dtype = (65535.0, np.uint16) if bits == 16 else (255.0, np.uint8)
    pixels_HW3 = np.empty((H, W, 3), dtype)
    rows = max(1, band_px // W)
    for r in range(0, H, rows):
        rgb_13hW = reassemble(l_11HW[..., r : r + rows, :], ab_12Hs[..., r : r + rows, :])
        pixels_HW3[r : r + rows] = rgb_13hW[0].permute(1, 2, 0).mul_(top).round_().numpy()
    return pixels_HW3


# ---------------------------------------------------------------- planning and reading


def safe_relpath(name: str, *, member: bool = True) -> str:
    """An archive member's or key's path inside OUTPUT; `BadImage` if it would leave it.
    A member's backslashes separate folders (an archive made on Windows) and a drive or a
    URL scheme is refused; in a top-level file's name (`member` false), listed from a file
    system or a store, a backslash is a character of the name."""
    path = name.replace("\\", "/") if member else name
    normal = posixpath.normpath(path)
    if path.startswith("/") or normal in (".", "..") or normal.startswith("../"):
        raise BadImage(f"path escapes the output folder: {name!r}")
    if member and normal.split("/", 1)[0].endswith(":"):  # C:/x, s3://x (a colon elsewhere
        raise BadImage(f"path names a drive or a URL scheme: {name!r}")  # is a name's)
    if reason := _in_work_dir(normal):
        raise BadImage(reason)
    return normal


def _in_work_dir(rel: str) -> str | None:
    """Why an output at `rel` is refused: inside the job's own folder (its manifest)."""
    if rel.split("/", 1)[0] == WORK_DIR:
        return f"path inside the job's own folder {WORK_DIR}/: {rel!r}"
    return None


def _source_text(name: str) -> str:
    """`name` as text UTF-8 can encode, one to one, for sources (the manifest's keys): bytes
    that were not UTF-8, which Python keeps as surrogates (an old tar's names, a file
    system's in another encoding), become \\x escapes. Files are read by their own names."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _output_text(name: str) -> str:
    """`name` as text for an output path: a name that is not UTF-8 is read as Latin-1, the
    usual encoding of such names, which gives every byte a character of its own."""
    raw = name.encode("utf-8", "surrogateescape")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _separator(kind: str) -> str:
    """What joins an archive's source and a member's name in the member's source."""
    return ROW_SEP if kind == "parquet" else MEMBER_SEP


def _kind(path: str) -> str:
    name = path.lower()
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    return {".zip": "zip", ".parquet": "parquet"}.get(posixpath.splitext(name)[1], "image")


def plan(
    cfg: ColorizeConfig,
    done: Sequence[str],
    read: Mapping[str, tuple[int, int]] | None = None,
    written: Set[str] = frozenset(),
) -> tuple[list[dict], list[str], int]:
    """(work units in a fixed order, every top-level file's source URL, inputs skipped), for
    the sources in `done` being done already; an archive in `read` (source -> its members
    and its size then) was read through, and is skipped unopened when it has that size and
    `done` has a row for as many members. A file whose output may be one of the outputs
    `written` by earlier runs (a file added since, named as another's output) is refused."""
    read = read or {}
    fs, root = storage.filesystem(cfg.input, cfg.s3)
    if storage.with_retries(lambda: fs.isdir(root), what=f"stat {cfg.input}"):
        sizes = storage.file_sizes(cfg.input, cfg.s3)
        rels = sorted(sizes)
        urls = [storage.join(cfg.input, rel) for rel in rels]
    elif storage.exists(cfg.input, cfg.s3):
        rels, urls = [""], [cfg.input]
        sizes = {"": storage.with_retries(lambda: fs.size(root), what=f"stat {cfg.input}")}
    else:
        raise ValueError(f"INPUT {cfg.input}: no such file or folder")
    units, files, skipped, named = [], [], 0, set()
    names = [_top_level_name(rel, url) for rel, url in zip(rels, urls, strict=True)]
    done_set, done_sorted, inputs = set(done), sorted(done), {name for name, _ in names}
    sources = [_source_text(url) for url in urls]
    sources_sorted = sorted(sources)
    # Top-level files named like an archive's members (`a.zip!x.png` beside `a.zip`): by
    # archive, each as the rest of its source; and all of them, whole.
    tops: dict[str, list[str]] = {}
    named_like: set[str] = set()
    for url, source, (_, refusal) in zip(urls, sources, names, strict=True):
        if (kind := _kind(url)) != "image" and not refusal:
            mark = source + _separator(kind)
            tops[source] = _starting_with(sources_sorted, mark)
            named_like.update(mark + top for top in tops[source])
    names_sorted = sorted(inputs)
    for rel, url, source, (name, refusal) in zip(rels, urls, sources, names, strict=True):
        kind = _kind(url)
        archive = kind != "image" and not refusal and name not in named
        # its members' outputs go in a folder of its name: not where others' go
        if archive and rel and (beside := _starting_with(names_sorted, name + "/")):
            refusal = (f"its members' outputs would go in {name + '/'!r}, where another "
                       f"input's output {name + '/' + beside[0]!r} is")  # fmt: skip
        if archive and not refusal:  # else refused whole, as a file
            named.add(name)
            prefix = name if rel else ""
            members = _members(source, kind, done_sorted, sources_sorted)
            if source in done_set:  # the archive itself failed: nothing more to read in it
                skipped += 1
                continue
            skipped += len(members)
            if read.get(source) == (len(members), sizes[rel]):  # every member done, unchanged
                continue
            unit = {"kind": kind, "url": url, "prefix": prefix, "done": members}
            if tops[source]:
                unit["tops"] = tops[source]  # numbered as members of their names would be
            units.extend(split_archive(unit | {"size": sizes[rel]}, cfg))
            continue
        if source in done_set and not _done_as_member(source, name, named_like, written, cfg):
            skipped += 1
            continue
        item = {"source": source, "rel": name, "size": sizes[rel]}
        if source != url:
            item["url"] = url  # read by its own name
        taken = _output_taken(name, inputs, cfg.format)
        made = next((n for n in _possible_outputs(name, cfg.format) if n in written), None)
        reason = (
            refusal
            or (taken and f"its output name {taken!r} is another input's")
            or (made and f"its output name {made!r} is another input's output, written before")
        )
        if name in named:  # a name that is not UTF-8, read as Latin-1, equals another's
            reason = f"another input's name reads as {name!r} too"
        named.add(name)
        files.append(item | ({"error": reason} if reason else {}))
    for start in range(0, len(files), cfg.files_per_task):
        units.append({"kind": "files", "items": files[start : start + cfg.files_per_task]})
    return units, sources, skipped


def _done_as_member(
    source: str, name: str, named_like: Set[str], written: Set[str], cfg: ColorizeConfig
) -> bool:
    """Whether the done row of the top-level file `source` (output name `name`) may be a
    member's: the file is named like a member of an archive beside it (`a.zip!x.png`), and
    none of its own outputs was written. Such a file, added after the archive was read, is
    done now; the member is numbered as a copy from then on (`_Names`), and its output is
    written again under that source."""
    return source in named_like and not any(
        n in written for n in _possible_outputs(name, cfg.format)
    )


def _top_level_name(rel: str, url: str) -> tuple[str, str | None]:
    """(the output name of a top-level input at `rel` below INPUT, why it is refused or
    None): its path made plain (``a/./b.png`` is ``a/b.png``), refused where it would leave
    OUTPUT (an S3 key may hold ``..``) or enter the job's own folder, as a member's is
    (`safe_relpath`). A single INPUT file's is its file name."""
    name = _output_text(rel or posixpath.basename(storage.split_url(url)[1]))
    try:
        return safe_relpath(name, member=False), None
    except BadImage as refused:
        return name, str(refused)


def _output_taken(rel: str, inputs: set[str], choice: str) -> str | None:
    """A name the output of the input at `rel` may get that is another input's."""
    return next((n for n in _possible_outputs(rel, choice) if n != rel and n in inputs), None)


def _possible_outputs(rel: str, choice: str) -> list[str]:
    """The names the output of the input at `rel` may get: `rel` with the format's suffix
    appended where it has not got it (`a.gif` -> `a.gif.png`). Its format is the chosen one,
    or TIFF for pages, or PNG for a picture with alpha where JPEG was chosen; a kept format
    may be any, whatever the suffix says (it is read from the bytes)."""
    if choice == "keep":  # read from the bytes, whatever the name says (a PNG named .jpg)
        formats = list(SUFFIXES)
    else:
        formats = [choice.upper(), "TIFF"] + (["PNG"] if choice == "jpeg" else [])
    return list(dict.fromkeys(output_name(rel, fmt) for fmt in formats))


def _members(archive: str, kind: str, sources: list[str], tops: list[str]) -> list[str]:
    """The members of `archive` (of `kind`) that sorted `sources` name, each as the rest of
    its source after the archive's mark: not the top-level files, of sorted `tops`, named
    like its members (``a.zip!x.png`` beside ``a.zip``)."""
    mark = archive + _separator(kind)
    members = _starting_with(sources, mark)
    if others := _starting_with(tops, mark):
        members = [m for m in members if not _within(m, others)]
    return members


def _within(member: str, others: list[str]) -> bool:
    """Whether `member` (a done source, relative to an archive's mark) is one of `others`
    (top-level sources named like its members, relative likewise) or inside one of them."""
    return any(member == o or member.startswith((o + MEMBER_SEP, o + ROW_SEP)) for o in others)


def _starting_with(sorted_sources: list[str], mark: str) -> list[str]:
    """The rest of each source that starts with `mark`, found by bisection in a sorted list."""
    found, i = [], bisect.bisect_left(sorted_sources, mark)
    while i < len(sorted_sources) and sorted_sources[i].startswith(mark):
        found.append(sorted_sources[i][len(mark) :])
        i += 1
    return found


def _read_row(url: str, members: int, size: int) -> dict:
    """An archive's READ row: read through, `members` inputs, `size` bytes."""
    reason = manifest.read_through_reason(members, size)
    return {**_row(_source_text(url)), "status": manifest.READ, "reason": reason}


def _row(source: str, rel: str = "", data: bytes = b"", reason: str = "") -> dict:
    return {
        "source": source,
        "rel": rel,
        "data": data,
        "status": "error" if reason else "pending",
        "reason": reason,
    }


def _read_files(unit: dict, cfg: ColorizeConfig) -> Iterator[dict]:
    limit = cfg.max_file_mb * 2**20
    items = unit["items"]
    refusals = [
        item.get("error")
        or (f"file too large: {item['size']} bytes" if item["size"] > limit else "")
        for item in items
    ]
    urls = [
        None if refused else item.get("url", item["source"])
        for item, refused in zip(items, refusals, strict=True)
    ]
    read = storage.read_each(urls, cfg.s3, sizes=[item["size"] for item in items])
    for item, refused, data in zip(items, refusals, read, strict=True):
        source = item["source"]
        if refused:
            yield _row(source, reason=refused)
        elif isinstance(data, FileNotFoundError):
            yield _row(source, reason="missing file")
        elif isinstance(data, OSError):
            yield _row(source, reason=f"unreadable file: {data}")
        elif isinstance(data, Exception):
            raise data
        else:
            yield _row(source, item["rel"], data)


Decided = tuple[str, str, str]
"""An archive member's source, path under OUTPUT ("" where refused) and reason for refusal."""


class _Names:
    """Names met in one archive or Parquet file. Tar and zip allow a name twice, and `./a`
    is `a`: a later member must not overwrite an earlier one's output (nor `a.gif.png` the
    output of `a.gif`), and a repeated name gets a source of its own so that the manifest
    tells the two apart. Members done by an earlier run are decided again, unread: those
    it wrote keep their paths taken, those it refused take none."""

    def __init__(self, unit: dict, choice: str) -> None:
        self.prefix, self.choice, self.finished = unit["prefix"], choice, set(unit["done"])
        self.outputs: set[str] = set()
        # Top-level files named like members (`a.zip!x.png`) have their sources: a member
        # of that name is numbered as a copy, as a second member of the name would be.
        self.sources: Counter[str] = Counter()
        if tops := unit.get("tops"):
            base = _source_text(unit["url"]) + _separator(unit["kind"])
            self.sources.update(base + top for top in tops)

    def source(self, source: str) -> str:
        """`source`, or where it was met before, `source (copy n)` with the first n not met
        (a member may itself be named like a copy)."""
        numbered = source
        while numbered in self.sources:
            self.sources[source] += 1
            numbered = f"{source} (copy {self.sources[source]})"
        self.sources[numbered] += 1
        return numbered

    def decide(self, base: str, name: str, kind: str) -> Decided | None:
        """What becomes of the next member, `name` (`base`: its archive's source and
        separator; `kind`: "dir", "file", or why a member that is neither is refused): None
        for a folder or a member an earlier run did, else its source, its path under OUTPUT
        and why it is refused ("" where it is not); records its output path as taken."""
        if kind == "dir":
            self.done(name)
            return None
        source = self.source(base + _source_text(name))
        finished = source[len(base) :] in self.finished  # decided again, as it was: a
        if kind != "file":  # refused member took no path, and must not take one now
            return None if finished else (source, "", kind)
        try:
            rel = _member_rel(self.prefix, name)
        except BadImage as e:
            return None if finished else (source, "", str(e))
        reason = self.clash(rel)
        if finished:
            return None
        return (source, "", reason) if reason else (source, rel, "")

    def done(self, name: str) -> None:
        with contextlib.suppress(BadImage):
            self.outputs.add(_member_rel(self.prefix, name))

    def clash(self, rel: str) -> str | None:
        """Why `rel` may not be written beside the earlier members, or None (and it is
        taken from now on)."""
        suffixes = [x for f in SUFFIXES.values() for x in f if rel.lower().endswith(x)]
        shorter = {rel[: -len(x)] for x in suffixes} & self.outputs
        if rel in self.outputs:
            reason = f"an earlier member has the same output path {rel!r}"
        elif taken := _output_taken(rel, self.outputs, self.choice):
            reason = f"its output name {taken!r} is an earlier member's"
        elif any(_output_taken(x, {rel}, self.choice) for x in shorter):
            reason = f"an earlier member's output is named {rel!r}"
        else:
            self.outputs.add(rel)
            return None
        return reason


def _member_rel(prefix: str, name: str) -> str:
    """The path under OUTPUT of the member `name` of the archive at `prefix`; `BadImage` if
    it would leave OUTPUT."""
    rel = safe_relpath(_output_text(name))
    return posixpath.join(prefix, rel) if prefix else rel


def _decider(unit: dict, cfg: ColorizeConfig) -> Callable[[int, str, str], Decided | None]:
    """`decide(i, name, kind)` for the members of `unit` in archive order (`i`: the member's
    number in the archive): made here, by `_Names`, for a whole archive; looked up in what the
    plan decided for a part of one (`split_archive`)."""
    base = _source_text(unit["url"]) + _separator(unit["kind"])
    if (part := unit.get("part")) is None:
        names = _Names(unit, cfg.format)
        return lambda i, name, kind: names.decide(base, name, kind)
    skipped, named = set(part["skip"]), {i: tuple(d) for i, *d in part["named"]}

    def decide(i: int, name: str, kind: str) -> Decided | None:
        if i in skipped:
            return None
        return named.get(i) or (base + _source_text(name), _member_rel(unit["prefix"], name), "")

    return decide


def _member_row(decided: Decided, size: int, read: Callable[[], bytes], cfg) -> dict:
    source, rel, reason = decided
    if reason:
        return _row(source, reason=reason)
    if size > cfg.max_file_mb * 2**20:
        return _row(source, reason=f"file too large: {size} bytes")
    try:
        data = read()
    except Exception as e:  # a corrupt member (bad compressed data, CRC): its own error
        if _storage_error(e):  # the archive's to read on (`read_unit`), not the member's
            raise
        return _row(source, reason=f"unreadable archive member: {type(e).__name__}: {e}")
    return _row(source, rel, data)


def _read_tar(unit: dict, cfg: ColorizeConfig, f) -> Iterator[dict]:
    decide = _decider(unit, cfg)
    with tars.open_tar(f, "r|*") as archive:
        for i, member in enumerate(archive):
            kind = "dir" if member.isdir() else "file" if member.isfile() else TAR_NOT_FILE
            if decided := decide(i, member.name, kind):
                read = lambda m=member: archive.extractfile(m).read()  # noqa: E731
                yield _member_row(decided, member.size, read, cfg)
        if damage := tars.damage(archive):  # the members after it are lost: the archive's row
            raise tarfile.ReadError(damage)


def _zip_members(archive: zipfile.ZipFile, size: int) -> list[zipfile.ZipInfo]:
    """The members of the zip `archive` of `size` bytes; `zipfile.BadZipFile` where their
    stored data overlap, or do not fit in the file: members that share their compressed
    data (a zip bomb of 2 MB may hold terabytes this way) each pass the size check."""
    infos = archive.infolist()
    ends = 0  # where the member before ends, at the least
    for info in sorted(infos, key=lambda i: i.header_offset):
        if info.header_offset < ends:
            raise zipfile.BadZipFile(f"members overlap in the archive (at {info.filename!r})")
        name = len(info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"))
        ends = info.header_offset + ZIP_LOCAL_HEADER_BYTES + name + info.compress_size
        if ends > size:
            raise zipfile.BadZipFile(f"member {info.filename!r} ends past the archive's end")
    return infos


def _zip_kind(info: zipfile.ZipInfo) -> str:
    if info.is_dir():
        return "dir"
    return ZIP_NOT_FILE if stat.S_ISLNK(info.external_attr >> 16) else "file"


def _in_part(unit: dict, members: int) -> range:
    """The numbers of the members `unit` reads of an archive of `members`: all, or its part's
    (refused where the archive has changed since the plan split it)."""
    if (part := unit.get("part")) is None:
        return range(members)
    if members != part["members"]:
        raise ValueError(f"the archive has {members} members now, {part['members']} when split")
    return range(part["start"], part["stop"])


def _unchanged(unit: dict, f, names: Callable[[], Iterable[str]]) -> None:
    """Refuses a split archive's part where the archive (open as `f`) is not what the plan
    split: its size, or its members' `names` (a function, called for parts only), are not
    the plan's. A part must not give one member's output another's name, and its members'
    names depend on those before them."""
    if "part" not in unit:
        return
    at = f.tell()
    size = f.seek(0, io.SEEK_END)
    f.seek(at)
    if size != unit["size"]:
        raise ValueError(f"the archive has changed since the job started: {size} bytes, not "
                         f"{unit['size']}")  # fmt: skip
    if _digest(names()) != unit["part"]["digest"]:
        raise ValueError("the archive has changed since the job started: other member names")


def _read_zip(unit: dict, cfg: ColorizeConfig, f) -> Iterator[dict]:
    decide = _decider(unit, cfg)
    with zipfile.ZipFile(f) as archive:
        infos = _zip_members(archive, f.seek(0, io.SEEK_END))
        rows = _in_part(unit, len(infos))
        _unchanged(unit, f, lambda: (info.filename for info in infos))
        for i in rows:
            info = infos[i]
            if decided := decide(i, info.filename, _zip_kind(info)):
                read = lambda z=info: archive.read(z)  # noqa: E731
                yield _member_row(decided, info.file_size, read, cfg)


def _parquet_columns(table, cfg: ColorizeConfig) -> tuple[str, str]:
    """(the column of image bytes, the column of names or "" for row numbers) of the
    `pyarrow.parquet.ParquetFile` `table`."""
    schema = table.schema_arrow
    column = cfg.parquet_column or next(
        (n for n in schema.names if _holds_bytes(schema.field(n).type)), None
    )
    if column is None:
        raise ValueError(
            "no column of image bytes (binary, or a struct with a binary field 'bytes', as "
            f"Hugging Face's Image feature writes) among {schema.names}: name it with "
            "--parquet-column"
        )
    key = cfg.parquet_key_column or next((n for n in PARQUET_KEY_COLUMNS if n in schema.names), "")
    if column not in schema.names or (key and key not in schema.names):
        raise ValueError(f"no column {column if column not in schema.names else key!r}")
    return column, key


def _holds_bytes(kind) -> bool:
    """Whether a Parquet column of type `kind` holds image bytes: binary, or a struct with
    a binary field ``bytes`` (Hugging Face's Image feature: {bytes, path})."""
    import pyarrow as pa

    binary = lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t)  # noqa: E731
    if pa.types.is_struct(kind):
        index = kind.get_field_index("bytes")
        return index >= 0 and binary(kind.field(index).type)
    return binary(kind)


def _row_bytes(value) -> bytes:
    """A Parquet row's image bytes: its value, or the ``bytes`` of a struct's (none: empty)."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return value or b""


def _row_name(key: str, value, number: int) -> str:
    """A Parquet row's name: its value in the key column `key`, else (no key column, or a
    null value) its number."""
    return str(value) if key and value is not None else f"{number:09d}"


def _row_names(f, table, key: str) -> list[str]:
    """The name of every row of the `pyarrow.parquet.ParquetFile` `table` of file `f`;
    `ValueError` where they hold more than `PARQUET_KEY_BYTES` a row (`_check_names`)."""
    import pyarrow.parquet as pq

    _check_names(table, key)
    count = table.metadata.num_rows
    if not key:
        return [_row_name(key, None, n) for n in range(count)]
    # Names of a dictionary-encoded column kept as its dictionary until counted: one long
    # name declared once may stand for every row
    names = pq.ParquetFile(f, read_dictionary=[key]).read(columns=[key]).column(0)
    if pa.types.is_dictionary(names.type):
        held = sum(pc.sum(pc.binary_length(c.dictionary).take(c.indices)).as_py() or 0
                   for c in names.chunks)  # fmt: skip
        if held > _names_bound(count):
            raise ValueError(f"column {key!r} holds {held} bytes of names for {count} rows")
    return [_row_name(key, value, n) for n, value in enumerate(names.to_pylist())]


def _names_bound(rows: int) -> int:
    return max(PARQUET_KEY_BYTES * rows, PARQUET_BATCH_BYTES)


def _check_names(table, key: str) -> None:
    """`ValueError` where the key column `key` of `table` declares more than
    `PARQUET_KEY_BYTES` a row: names no file system takes, of which a small compressed file
    may hold gigabytes."""
    count = table.metadata.num_rows
    held = _uncompressed(table, range(table.num_row_groups), key) if key else 0
    if held > _names_bound(count):
        raise ValueError(f"column {key!r} holds {held} bytes of names for {count} rows")


def _row_bytes_bound(table, group: int, column: str) -> float:
    """The most bytes a row of row `group` of `table` may hold in `column`, by the sizes
    the file declares: the chunk's whole where it is dictionary-encoded (one value declared
    once may be every row's), else a row's share of it."""
    chunks = _column_chunks(table, group, column)
    declared = sum(c.total_uncompressed_size for c in chunks)
    if any(c.has_dictionary_page for c in chunks):
        return declared
    return declared / table.metadata.row_group(group).num_rows


def _uncompressed(table, groups: Iterable[int], column: str) -> int:
    """The bytes the row `groups` of `table` declare `column` holds uncompressed."""
    return sum(c.total_uncompressed_size for g in groups for c in _column_chunks(table, g, column))


def _column_chunks(table, group: int, column: str) -> list:
    """The column chunks' metadata of `column` (all its leaves) in row `group` of `table`."""
    chunks = table.metadata.row_group(group)
    return [chunks.column(c) for c in range(chunks.num_columns)
            if _leaf_of(chunks.column(c).path_in_schema, column)]  # fmt: skip


def _read_parquet(unit: dict, cfg: ColorizeConfig, f) -> Iterator[dict]:
    import pyarrow.parquet as pq

    decide, table = _decider(unit, cfg), pq.ParquetFile(f)
    column, key = _parquet_columns(table, cfg)
    rows = _in_part(unit, table.metadata.num_rows)
    _unchanged(unit, f, lambda: _row_names(f, table, key))
    _check_names(table, key)
    number = rows.start
    for group in _row_groups(table, rows):
        count = table.metadata.row_group(group).num_rows
        declared = _uncompressed(table, [group], column)
        if count == 1 and declared > cfg.max_file_mb * 2**20 + MEMBER_SLACK_BYTES:  # unread
            if decided := decide(number, _row_name(key, _first_key(table, group, key), number),
                                 "file"):  # fmt: skip
                source, _, reason = decided
                yield _row(source, reason=reason or f"file too large: its row declares {declared} "
                           "bytes")  # fmt: skip
            number += 1
            continue
        # Batches of about PARQUET_BATCH_BYTES by the declared sizes: rows of images are
        # decompressed a batch at a time
        per_row = sum(_row_bytes_bound(table, group, c) for c in (column, key) if c)
        batch_rows = max(1, min(64, int(PARQUET_BATCH_BYTES // max(per_row, 1))))
        batches = table.iter_batches(
            batch_size=batch_rows, row_groups=[group], columns=[column] + ([key] if key else [])
        )
        for batch in batches:
            for row in batch.to_pylist():
                if decided := decide(number, _row_name(key, row.get(key), number), "file"):
                    data = _row_bytes(row[column])
                    yield _member_row(decided, len(data), lambda d=data: d, cfg)
                number += 1


def _first_key(table, group: int, key: str):
    """The key column's value in the first row of row `group` of `table` (None: no key)."""
    return table.read_row_group(group, columns=[key]).column(0)[0].as_py() if key else None


def _row_groups(table, rows: range) -> list[int]:
    """The row groups of `table` that hold exactly `rows` (a part ends at a row group's end;
    refused where the file's groups no longer do, the file having changed since the plan)."""
    groups, first, held, starts = [], 0, 0, {0}
    for g in range(table.num_row_groups):
        count = table.metadata.row_group(g).num_rows
        if rows.start <= first < rows.stop:
            groups.append(g)
            held += count
        first += count
        starts.add(first)
    if held != len(rows) or rows.start not in starts:
        raise ValueError("the file's row groups have changed since the job started")
    return groups


_ARCHIVE_READERS = {"tar": _read_tar, "zip": _read_zip, "parquet": _read_parquet}
_ARCHIVE_ERRORS = (
    OSError, EOFError, ValueError, tarfile.TarError, zipfile.BadZipFile, zlib.error,
    NotImplementedError,  # zipfile: a zip version or compression method it does not read
)  # fmt: skip


def read_unit(row: dict, cfg: ColorizeConfig) -> Iterator[dict]:
    """Every not-yet-done input of one work unit as a row (bytes, or an error).

    An archive whose reading breaks off with a storage error (a connection reset deep into
    a large tar, after the storage client's own retries) is opened again and read on from
    where it broke off, up to `ARCHIVE_READ_ATTEMPTS` times in all; its members then keep
    their names and numbering. A damaged archive is not read again: what could be read of
    it was, and the archive gets an error row of its own."""
    unit = json.loads(row["unit"])
    if unit["kind"] == "files":
        yield from _read_files(unit, cfg)
        return
    url, count = unit["url"], 0
    for attempt in range(1, ARCHIVE_READ_ATTEMPTS + 1):
        try:
            fs, path = storage.filesystem(url, cfg.s3, streamed=True)
            with fs.open(path, "rb", **_block_size(unit, fs)) as f:
                for i, item in enumerate(_ARCHIVE_READERS[unit["kind"]](unit, cfg, f)):
                    if i >= count:  # the rows before were given out before the break
                        count += 1
                        yield item
            if "part" not in unit:  # a split archive's row is the driver's (`_read_through`)
                # Read through: a re-run that has a row for each of its members skips it,
                # and an earlier error row of it (when its reading broke off) is cleared.
                yield _read_row(url, count + len(unit["done"]), unit["size"])
            return
        except Exception as e:
            storage_error = _storage_error(e)
            if not storage_error and not isinstance(e, _ARCHIVE_ERRORS):
                raise  # neither the storage nor the archive's bytes: a bug to see
            if storage_error and attempt < ARCHIVE_READ_ATTEMPTS:
                log.warning("colorize: reading %s broke off after %d members (%s: %s); "
                            "reading on, attempt %d of %d", url, count, type(e).__name__, e,
                            attempt + 1, ARCHIVE_READ_ATTEMPTS)  # fmt: skip
                time.sleep(ARCHIVE_RETRY_DELAY_S * attempt)
                continue
            # The archive itself is an input too: recorded once, after what could be read.
            part = unit.get("part")
            span = f" (reading its members {part['start']} to {part['stop'] - 1})" if part else ""
            yield _row(
                _source_text(url),
                reason=f"unreadable archive after {count} members{span}: {type(e).__name__}: {e}",
            )
            return


def _block_size(unit: dict, fs) -> dict:
    """The read-ahead of a split archive's part: its members' bytes (with `MEMBER_SLACK_BYTES`
    each for a zip member's local header or a Parquet row's key) where they are fewer than
    the storage client's usual block, so that a part reads its share of the archive in one
    request rather than a block of the parts after it."""
    usual = getattr(fs, "default_block_size", None)  # s3fs, gcsfs; local files: none
    if "part" not in unit or not usual:
        return {}
    part = unit["part"]
    members = part["stop"] - part["start"]
    return {"block_size": min(usual, part["bytes"] + MEMBER_SLACK_BYTES * members)}


def _storage_error(error: BaseException | None) -> bool:
    """Whether an archive read failed in the storage rather than in the archive's bytes:
    an I/O error, or an archive error raised on one (zipfile reports a failed read of the
    directory as a bad zip). The decompressors of gzip and bz2 report damaged data as
    OSError too, with no errno."""
    while error is not None:
        plain = type(error) in (OSError, gzip.BadGzipFile) and error.errno is None
        if not plain and storage.from_storage(error):  # s3fs's read errors included
            return True
        error = error.__cause__ or error.__context__
    return False


def split_archive(unit: dict, cfg: ColorizeConfig) -> list[dict]:
    """`unit` as the units its reading takes: a zip or Parquet file above
    `cfg.archive_part_mb` in parts of about that many MB of members, each read by a task of
    its own; anything else whole, by one task. The members of a split archive are decided
    here, in archive order, as the one task reading it whole would decide them (`_Names`),
    and a part carries only what differs from a member's plain name: the members it skips
    (folders, inputs done by an earlier run) and those numbered as copies or refused. An
    archive whose index does not read stays whole: its task records why.

    Every part reads the archive's index (a zip's central directory, a Parquet footer and
    key column, whose names it checks): the parts are made few enough that these reads come
    to at most the larger of
    `INDEX_REREADS` of the archive's size and `INDEX_REREADS_FLOOR` bytes (a zip of a
    million members has about 100 MB of directory)."""
    if unit["kind"] not in ("zip", "parquet") or unit["size"] <= cfg.archive_part_mb * 2**20:
        return [unit]
    fs, path = storage.filesystem(unit["url"], cfg.s3)

    def index() -> tuple[list[tuple[str, str]], list[tuple[int, int]], int]:
        with fs.open(path, "rb") as f:
            return _archive_index(unit["kind"], f, cfg)

    try:
        members, blocks, index_bytes = storage.with_retries(index, what=f"index {unit['url']}")
    except Exception as e:
        if not isinstance(e, _ARCHIVE_ERRORS) and not _storage_error(e):
            raise
        log.warning("colorize: %s is read by one task: its index does not read (%s: %s)",
                    unit["url"], type(e).__name__, e)  # fmt: skip
        return [unit]
    rereads = max(INDEX_REREADS * unit["size"], INDEX_REREADS_FLOOR)
    most = max(1, int(rereads / max(index_bytes, 1)))
    target = max(cfg.archive_part_mb * 2**20, unit["size"] / most)
    parts, decided = _decided_parts(unit, cfg, members, _part_spans(blocks, target, len(members)))
    # What the archive's READ row counts, as a task reading it whole counts it: the members
    # it gives rows of, and the done rows under its name (which may name members since gone).
    digest = _digest(name for name, _ in members)
    shared = {"members": len(members), "inputs": decided + len(unit["done"]), "digest": digest}
    whole = {k: v for k, v in unit.items() if k != "tops"}  # the plan named its members
    return [whole | {"done": [], "part": part | shared} for part in parts]


def _part_spans(blocks: list[tuple[int, int]], target: float, members: int) -> list[tuple]:
    """(first member, end, bytes) of parts of at least `target` bytes of `blocks` (first
    member, bytes), each starting at a block (zip: any member; Parquet: a row group)."""
    starts, totals = [0], [0]
    for first, size in blocks:
        if totals[-1] >= target:
            starts.append(first)
            totals.append(0)
        totals[-1] += size
    return list(zip(starts, [*starts[1:], members], totals, strict=True))


def _decided_parts(
    unit: dict, cfg: ColorizeConfig, members: list[tuple[str, str]], spans: list[tuple]
) -> tuple[list[dict], int]:
    """(each span's part: its range, bytes, skipped and named members; the members decided
    to give a row). Members are decided in archive order; a part that skips every member
    is left out, but for the last when no other is left, so that the archive's READ row
    still comes once its parts have read through."""
    names, base = _Names(unit, cfg.format), _source_text(unit["url"]) + _separator(unit["kind"])
    parts, decided_count = [], 0
    for start, stop, total in spans:
        skip, named = [], []
        for i in range(start, stop):
            name, kind = members[i]
            decided = names.decide(base, name, kind)
            if decided is None:
                skip.append(i)
                continue
            decided_count += 1
            if decided[2] or decided[0] != base + _source_text(name):
                named.append([i, *decided])
        if len(skip) < stop - start or (stop == len(members) and not parts):
            parts.append(
                {"start": start, "stop": stop, "bytes": total, "skip": skip, "named": named}
            )
    return parts, decided_count


def _leaf_of(path: str, column: str) -> bool:
    """Whether a Parquet column chunk's path is the column's, or one of its fields' (a
    struct's leaves: Hugging Face's Image column is ``image.bytes`` and ``image.path``)."""
    return bool(column) and (path == column or path.startswith(column + "."))


def _digest(names: Iterable[str]) -> int:
    """A checksum of an archive's member names, which its parts' tasks compare with the
    plan's: the names of one part's members depend on those of the members before it."""
    return zlib.crc32("\0".join(names).encode("utf-8", "surrogateescape"))


def _archive_index(kind: str, f, cfg: ColorizeConfig) -> tuple[list, list, int]:
    """(each member's name and kind, in archive order; the blocks a part may start at, as
    (first member, bytes); the bytes of the index) of the zip or Parquet file `f`: zip
    members one by one, Parquet row groups."""
    if kind == "zip":
        with zipfile.ZipFile(f) as archive:
            infos = _zip_members(archive, f.seek(0, io.SEEK_END))
        members = [(info.filename, _zip_kind(info)) for info in infos]
        blocks = [(i, info.compress_size) for i, info in enumerate(infos)]
        entries = (len(i.orig_filename) + len(i.extra) + len(i.comment) for i in infos)
        return members, blocks, ZIP_ENTRY_BYTES * len(infos) + sum(entries)
    import pyarrow.parquet as pq

    table = pq.ParquetFile(f)
    column, key = _parquet_columns(table, cfg)
    members = [(name, "file") for name in _row_names(f, table, key)]
    blocks, first, keys = [], 0, 0
    for g in range(table.num_row_groups):
        size = sum(c.total_compressed_size for c in _column_chunks(table, g, column))
        keys += sum(c.total_compressed_size for c in _column_chunks(table, g, key))
        blocks.append((first, size))
        first += table.metadata.row_group(g).num_rows
    return members, blocks, table.metadata.serialized_size + keys  # each part reads the keys


# ---------------------------------------------------------------- the pipeline stages


@dataclass(frozen=True)
class Prepared:
    """What `prepare_row` decoded and computed, kept for `colorize_file` when both run in
    one process (`WholeStage`): the source is then decoded once. Only each page's L is kept
    of its pixels (4 bytes a pixel, against 12 more for its RGB planes)."""

    decoded: Decoded  # pages without their planes (rgb None)
    lightness: list[torch.Tensor]  # each page's full-size L, (1, 1, H, W)


def prepare_row(row: dict, cfg: ColorizeConfig, provenance: str = "", keep: bool = False) -> dict:
    """Decode and compute the network's input: adds `l_small` (P, 1, S, S fp32 bytes), and
    with `keep` the `Prepared` source as `prepared` (in-process use only).

    A JPEG bound for the device path (``cfg.jpeg_path == "device"``, see `_device_jpeg`)
    is not decoded: only its header is read, and its metadata is prepared as the APP
    segments the model actor splices into its output (`segments`)."""
    out = {**row, "l_small": b"", "pages": 0, "route": "cpu", "segments": b"", "orientation": 1,
           "profile": b""}  # fmt: skip
    if keep:  # every row of a batch has the same columns
        out["prepared"] = None
    if row["status"] != "pending":
        return out
    try:
        if cfg.jpeg_path == "device" and cfg.format in ("keep", "jpeg"):
            header = _device_jpeg(row["data"], cfg, provenance)
            if header is not None:
                segments, turn, profile = header
                device = {"route": "device", "segments": segments, "orientation": turn}
                return {**out, "pages": 1, "profile": profile, **device}
        decoded = decode(row["data"], cfg.max_pixels, min_page_px=cfg.infer_px**2)
        inputs = [network_input(page.rgb, cfg.infer_px) for page in decoded.pages]
    except Exception as e:  # one input's failure, whatever it is, must not stop the job
        return {**out, "status": "error", "reason": _reason(e), "data": b""}
    small = [l_small for _, l_small in inputs]
    if keep:
        pages = [dataclasses.replace(page, rgb=None) for page in decoded.pages]
        lightness = [l_full for l_full, _ in inputs]
        out["prepared"] = Prepared(dataclasses.replace(decoded, pages=pages), lightness)
    return {**out, "l_small": torch.cat(small).numpy().tobytes(), "pages": len(small)}


def prepare_stage(batch: dict[str, np.ndarray], cfg: ColorizeConfig, provenance: str) -> pa.Table:
    """`prepare_row` of each row of a block, as the decode tasks of split stages run it,
    guarded (`crash_guard`); a table of the columns' own types, as rows would give."""

    def prepare(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _as_batch([prepare_row(row, cfg, provenance) for row in _as_rows(rows)])

    out = crash_guard(cfg)("prepare", batch, prepare)
    return pa.table({name: pa.array(column.tolist()) for name, column in out.items()})


def crash_guard(cfg: ColorizeConfig) -> CrashGuard:
    """The guard of the stages' work against inputs that take their process down, its
    records in OUTPUT's work folder."""
    folder = storage.join(cfg.output, WORK_DIR, "crashes")
    hint = "; a re-run with --retry-errors tries it again"
    return CrashGuard(folder, cfg.s3, cfg.crash_tries, doing="colorized", hint=hint)


def _device_jpeg(
    data: bytes, cfg: ColorizeConfig, provenance: str
) -> tuple[bytes, int, bytes] | None:
    """(APP segments, EXIF orientation, the ICC profile its pixels are converted from, or
    b"" for sRGB's) of a JPEG the device path can take, or None (CPU path)."""
    from jobs.colorize_jpeg import eligible

    if not data.startswith(b"\xff\xd8"):  # not a JPEG: `decode` reads it (or says why not)
        return None
    image = open_image(data, max_pixels=cfg.max_pixels)
    if not eligible(data, image):
        return None
    meta = read_metadata(image)
    exif = exif_bytes(meta, provenance, EXIF_SEGMENT_MAX)
    segments = app_segments(exif, icc=meta.icc, xmp=meta.xmp, iptc=meta.iptc, dpi=meta.dpi)
    profile = page_profile(image)
    return segments, exif_orientation(image), profile if icc.converts(profile) else b""


def _reason(error: Exception) -> str:
    if out_of_memory(error):  # the node's state, not the input's: a re-run tries it again
        return f"{OUT_OF_MEMORY} ({type(error).__name__}: {error})"[:300]
    return str(error) if isinstance(error, BadImage) else f"{type(error).__name__}: {error}"


class Colorizer:
    """The model actor: a batch of rows with `l_small` -> the same rows with `ab_small`;
    rows routed to the device path come out colorized and encoded (`encoded`); rows no longer
    pending pass through. Called as a stage, its work is guarded (`crash_guard`). Without
    `model` it loads cfg.model, which must hash to `model_sha256` when given. With dtype int8
    it builds the network of `int8` (the driver's `check_int8`), or checks one itself. On CPUs
    it has the process keep freed memory for its next batches (`keep_freed_memory`)."""

    def __init__(
        self,
        cfg: ColorizeConfig,
        model: torch.nn.Module | None = None,
        int8: Int8Plan | None = None,
        model_sha256: str | None = None,
    ) -> None:
        from jobs.models import load_model

        self.cfg = cfg
        self.precision = choose_precision(cfg.device, cfg.dtype)
        if self.precision.device.type == "cpu":
            torch.set_num_threads(max(1, round(cfg.actor_cpus)))
            keep_freed_memory()
        if model is None:
            model = load_model(cfg.model, cfg.s3, model_sha256).model
        model = model.eval()
        if self.precision.int8 and not isinstance(model, Int8ColorizationNet):
            # built as loaded, as the driver's check was (channels_last moves fp32 sums)
            model = int8.build(model) if int8 else check_int8(model, cfg)
        self.model = model.to(self.precision.device, memory_format=torch.channels_last)
        self.jpeg = None
        if cfg.jpeg_path == "device":
            from jobs.colorize_jpeg import JpegColorizer

            self.jpeg = JpegColorizer(
                self.model,
                self.precision,
                infer_px=cfg.infer_px,
                temperature=cfg.temperature,
                quality=cfg.quality,
                compile=cfg.compile,
                encode_threads=(threads := _encode_threads(cfg, self.precision.device)),
                cpu_encode_pieces=cfg.cpu_encode_pieces if threads else 0.0,
            )
            self.forward = self.jpeg.forward  # one compiled model for both paths
        else:
            self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.guard = crash_guard(cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.guard("model", batch, self.colorize)

    def colorize(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = {k: v.copy() for k, v in batch.items()}
        encoded = self._device_path(batch)
        pages = [int(p) for p in batch["pages"]]
        pending = batch["status"] == "pending"
        # rows already failed (or given up) are passed on; device-path rows are done
        todo = [i for i, p in enumerate(pages) if p and pending[i] and not encoded[i]]
        ab_small = np.empty(len(pages), dtype=object)
        ab_small[:] = [b""] * len(pages)
        if todo:
            s = self.cfg.infer_px
            stacked = [np.frombuffer(batch["l_small"][i], np.float32) for i in todo]
            l_N1SS = torch.from_numpy(np.concatenate(stacked).reshape(-1, 1, s, s))
            # A batch's images, each a file's page, at most a batch's worth at once: a file
            # may hold many pages.
            chunks = l_N1SS.split(max(1, self.cfg.batch_size))
            ab_N2ss = torch.cat([predict_ab(self.forward, chunk, self.cfg.temperature,
                                            self.precision).cpu() for chunk in chunks])  # fmt: skip
            parts = torch.split(ab_N2ss, [pages[i] for i in todo])
            for index, part in zip(todo, parts, strict=True):
                ab_small[index] = part.numpy().tobytes()
        dropped = ("l_small", "segments", "orientation", "profile")
        out = {k: v for k, v in batch.items() if k not in dropped}
        out["ab_small"] = ab_small
        out["encoded"] = encoded
        return out

    def _device_path(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Colorizes the batch's device-path rows; a row the codec fails on is prepared
        for the CPU path here instead (which colorizes it or records why it cannot)."""
        encoded = np.empty(len(batch["route"]), dtype=object)
        encoded[:] = [b""] * len(encoded)
        pending = batch["status"] == "pending"
        rows = [i for i, route in enumerate(batch["route"]) if route == "device" and pending[i]]
        if not rows:
            return encoded
        results = self.jpeg(
            [batch["data"][i] for i in rows],
            [batch["segments"][i] for i in rows],
            [int(batch["orientation"][i]) for i in rows],
            [batch["profile"][i] for i in rows],
        )
        cpu = dataclasses.replace(self.cfg, jpeg_path="cpu")
        for i, data in zip(rows, results, strict=True):
            if data is not None:
                encoded[i] = data
                continue
            row = {k: batch[k][i] for k in ("source", "rel", "data", "status", "reason")}
            redo = prepare_row(row, cpu)
            for key in ("l_small", "pages", "route", "status", "reason", "data"):
                batch[key][i] = redo[key]
        return encoded


def _encode_threads(cfg: ColorizeConfig, device: torch.device) -> int:
    """cfg.encode_threads, or by default on a GPU the CPUs per GPU of this node, less one for
    the thread that drives the GPU (none on CPUs, where every actor encodes its own)."""
    if cfg.encode_threads is not None:
        return cfg.encode_threads
    if device.type != "cuda":
        return 0
    cpus, gpus = _node_resources() or (os.cpu_count() or 1, torch.cuda.device_count())
    return max(0, int(cpus // max(1, gpus)) - 1)


def _node_resources() -> tuple[float, float] | None:
    """(CPUs, GPUs) of this node as Ray counts them, in a Ray worker (an actor's
    torch.cuda.device_count() sees its own GPU only); None elsewhere."""
    ray = sys.modules.get("ray")  # imported in a Ray worker; not worth importing otherwise
    if ray is None or not ray.is_initialized():
        return None
    node = ray.get_runtime_context().get_node_id()
    resources = next((n["Resources"] for n in ray.nodes() if n["NodeID"] == node), None)
    return None if resources is None else (resources.get("CPU", 0.0), resources.get("GPU", 0.0))


def colorize_file(
    data: bytes,
    ab_bytes: bytes,
    cfg: ColorizeConfig,
    provenance: str,
    prepared: Prepared | None = None,
):
    """Source bytes (or what `prepare_row` kept of them) + predicted ab -> (output bytes,
    format, (H, W) of the first page)."""
    if prepared is None:
        decoded = decode(data, cfg.max_pixels)
        lightness = [rgb_to_lightness(page.rgb) for page in decoded.pages]
    else:
        decoded, lightness = prepared.decoded, prepared.lightness
    s = cfg.infer_px // 4
    ab_P2ss = torch.from_numpy(np.frombuffer(ab_bytes, np.float32).reshape(-1, 2, s, s).copy())
    fmt = output_format(decoded, cfg.format)
    # 16 bits where a conversion into the output's profile follows, rounded to 8 after it
    bits = 16 if fmt.endswith("16") or icc.converts(decoded.meta.icc) else 8
    rgb_pages = [
        reassemble_pixels(l_11HW, ab_12ss, bits)
        for l_11HW, ab_12ss in zip(lightness, ab_P2ss.split(1), strict=True)
    ]
    size = tuple(lightness[0].shape[-2:])
    return encode(rgb_pages, decoded, fmt, provenance, cfg.quality), fmt, size


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _finish_row(row: dict, cfg: ColorizeConfig, provenance: dict) -> dict:
    start = time.monotonic()
    result = {
        "source": row["source"],
        "output": "",
        "status": row["status"],
        "reason": row["reason"],
        "pages": int(row["pages"]),
        "width_px": 0,
        "height_px": 0,
        "model_sha256": provenance["model_sha256"],
        "temperature": provenance["temperature"],
    }
    if row["status"] == "pending":
        try:
            if row.get("encoded"):  # colorized and encoded on the model's device
                data, fmt = row["encoded"], "JPEG"
                w, h = open_image(data, max_pixels=cfg.max_pixels).size
            else:
                text = provenance["text"]
                data, fmt, (h, w) = colorize_file(
                    row["data"], row["ab_small"], cfg, text, row.get("prepared")
                )
            name = output_name(row["rel"], fmt)
            storage.write_bytes(storage.join(cfg.output, name), data, cfg.s3)
            result.update(output=name, status="ok", width_px=int(w), height_px=int(h))
        except Exception as e:  # e.g. storage refusing the write, after its retries
            result.update(status="error", reason=_reason(e))
    result["seconds"] = time.monotonic() - start
    result["time"] = _now()
    return result


def write_batch(batch: dict[str, np.ndarray], cfg: ColorizeConfig, provenance: dict) -> dict:
    """Colorize and write a batch's outputs, then its manifest part; returns the part's rows
    (with `manifest.PART_COLUMNS`)."""
    results = [_finish_row(row, cfg, provenance) for row in _as_rows(batch)]
    return manifest.with_part(*manifest.write_part(results, cfg.output, cfg.s3))


def write_stage(batch: dict[str, np.ndarray], cfg: ColorizeConfig, provenance: dict) -> dict:
    """`write_batch` as the write tasks of split stages run it, guarded (`crash_guard`)."""
    return crash_guard(cfg)("write", batch, lambda b: write_batch(b, cfg, provenance))


# ---------------------------------------------------------------- the job


@dataclass(frozen=True)
class Summary:
    inputs: int
    outputs: int
    errors: int
    skipped: int
    """Inputs already done by an earlier run of the same command."""
    manifest_url: str
    table: pa.Table
    """The manifest: one row per input (`manifest.SCHEMA`), by source."""


def _provenance(sha256: str, cfg: ColorizeConfig) -> dict:
    text = (
        f"colorized by colorcore (Zhang et al. ECCV 2016); model sha256={sha256}; "
        f"temperature={cfg.temperature}{'; int8' if cfg.dtype == 'int8' else ''}"
    )
    return {"model_sha256": sha256, "temperature": cfg.temperature, "text": text}


def _as_rows(batch: dict[str, np.ndarray]) -> list[dict]:
    keys = list(batch)
    return [dict(zip(keys, values, strict=True)) for values in zip(*batch.values(), strict=True)]


def _as_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    batch = {}
    for key in rows[0]:
        column = np.empty(len(rows), dtype=object)
        column[:] = [r[key] for r in rows]
        batch[key] = column
    return batch


def _resolve_jpeg_path(cfg: ColorizeConfig, model_on_gpu: bool) -> ColorizeConfig:
    if cfg.jpeg_path != "auto":
        return cfg
    return dataclasses.replace(cfg, jpeg_path="device" if model_on_gpu else "cpu")


class WholeStage:
    """Every stage after reading in one process: decode, model, reassemble, encode, write.
    On CPUs, where every stage competes for the same cores, a model actor that does its
    rows' whole work saves the hand-offs between stages (each row's bytes and network input
    through the object store, a task per block) and keeps its cores busy."""

    def __init__(
        self,
        cfg: ColorizeConfig,
        provenance: dict,
        model: torch.nn.Module | None = None,
        int8: Int8Plan | None = None,
        model_sha256: str | None = None,
    ) -> None:
        self.cfg, self.provenance = cfg, provenance
        self.colorizer = Colorizer(cfg, model, int8, model_sha256)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.colorizer.guard("whole", batch, self.work)

    def work(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each row's full-size L waits for the network: once the rows so far hold
        `WHOLE_STAGE_PIXELS`, they are colorized and written before the next is decoded, so
        an actor's memory stays bounded however large the scans of a batch."""
        text, groups, pending, pixels = self.provenance["text"], [], [], 0
        for row in _as_rows(batch):
            pending.append(prepare_row(row, self.cfg, text, keep=True))
            if (kept := pending[-1]["prepared"]) is not None:
                pixels += sum(l_11HW.numel() for l_11HW in kept.lightness)
            if pixels >= WHOLE_STAGE_PIXELS:
                groups.append(self._finish(pending))
                pending, pixels = [], 0
        if pending:
            groups.append(self._finish(pending))
        return {k: np.concatenate([g[k] for g in groups]) for k in groups[0]}

    def _finish(self, rows: list[dict]) -> dict[str, np.ndarray]:
        return write_batch(self.colorizer.colorize(_as_batch(rows)), self.cfg, self.provenance)


def check_int8(model: torch.nn.Module, cfg: ColorizeConfig) -> Int8ColorizationNet:
    """`model` (eval mode) in int8 (`colorcore.int8`) if its colours stay within
    `int8_max_ab_error` of fp32's on the calibration photos; a ValueError saying by how much
    they do not otherwise."""
    from jobs.models import int8_model

    int8, error = int8_model(model, cfg.temperature, "colorize")
    if not error.mean <= cfg.int8_max_ab_error:
        raise ValueError(
            f"int8 moves this model's colours by {error.mean:.2f} ab units on average on the "
            f"calibration photos, more than --int8-max-ab-error {cfg.int8_max_ab_error}: "
            "run it in bf16 or fp32 (--dtype auto), or accept more"
        )
    return int8


def _run_in_process(units: list[dict], cfg: ColorizeConfig, model, provenance: dict) -> int:
    on_gpu = choose_precision(cfg.device, cfg.dtype).device.type == "cuda"
    cfg = _resolve_jpeg_path(cfg, on_gpu)
    rows = [r for u in units for r in read_unit({"unit": json.dumps(u)}, cfg)]
    if rows:
        WholeStage(cfg, provenance, model)(_as_batch(rows))
    return len(rows)


def _gpus(cfg: ColorizeConfig, cluster_gpus: int) -> int:
    """GPUs for the model actors: with device cuda (or an accelerator type named),
    model_actors of them (at least one) even when the cluster has none yet, for an
    autoscaler to start GPU nodes; with auto, the cluster's at the start; with cpu, none."""
    if cfg.device.startswith("cuda") or cfg.accelerator_type:
        return max(cluster_gpus, cfg.model_actors, 1)
    return cluster_gpus if cfg.device == "auto" and cfg.dtype != "int8" else 0


def _gpu_flag(cfg: ColorizeConfig) -> str:
    """The flag that asks for GPUs, for messages."""
    return "--device cuda" if cfg.device.startswith("cuda") else "--accelerator-type"


def _model_actors(cfg: ColorizeConfig, gpus: int, cpus: float) -> int:
    """One per GPU; on CPUs, where the actors do every stage but reading (`WholeStage`),
    as many as half the CPUs hold in Ray's accounting: with more, Ray Data starves the read
    tasks and the pipeline stalls. At the default actor_cpus (0.5), one actor per core, each
    running one torch thread."""
    if cfg.model_actors:
        return cfg.model_actors
    return gpus or max(1, int(cpus / 2 / cfg.actor_cpus))


def _run_on_ray(
    units: list[dict],
    cfg: ColorizeConfig,
    provenance: dict,
    int8: Int8Plan | None = None,
    model_sha256: str | None = None,
) -> int:
    import ray

    from jobs.runtime import check_accelerator_type, check_gpus, check_local_fit, init_ray

    wanted = _gpus(cfg, cluster_gpus=0)
    check_gpus(wanted, f"{_gpu_flag(cfg)} ({wanted} model actor(s), a GPU each)")
    init_ray(paths=[cfg.input, cfg.output, cfg.model])
    check_accelerator_type(cfg.accelerator_type, "colorize --accelerator-type")
    resources = ray.cluster_resources()
    gpus = _gpus(cfg, int(resources.get("GPU", 0)))
    actors = _model_actors(cfg, gpus, resources.get("CPU", 1))
    cfg = _resolve_jpeg_path(cfg, gpus > 0)
    cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size or (64 if gpus else 8))
    fused = cfg.stages == "fused" or (cfg.stages == "auto" and not gpus)
    check_local_fit(
        f"colorize needs {actors} model actor(s) of {cfg.actor_cpus:g} CPUs"
        f"{' and a GPU' if gpus else ''} each",
        {"CPU": cfg.actor_cpus, "GPU": 1 if gpus else 0},
        actors,
        beside={"CPU": cfg.task_cpus / 2 if fused else cfg.task_cpus},  # the reads, or stages
        hint="lower --model-actors or --actor-cpus",
    )
    where = "on the model's device" if cfg.jpeg_path == "device" else "on CPUs"
    print(
        f"colorize: {actors} model actor(s) on {'GPU' if gpus else 'CPU'}"
        f"{', each doing every stage' if fused else ''}; JPEGs coded {where}"
    )
    # Ray tries a task or actor call whose process died again for ever: the stages' guards
    # give up the inputs that kill theirs. A killed run's records are of batches that need
    # not recur.
    crash_guard(cfg).clear()
    rows = [{"unit": json.dumps(u)} for u in units]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    # The reads' rows in blocks of about READ_BLOCK_BYTES, as they come: one archive or file
    # group feeds every model actor, not one. Where the actors leave a CPU, blocks are also
    # cut to a batch of rows (small images cost the network as much as large ones, and the
    # actors take them as they come): the repartition's tasks take a whole CPU each, which
    # beside the actors of a node of one or two CPUs there is not, and it would wait for ever.
    ds.context.target_max_block_size = READ_BLOCK_BYTES
    ds = ds.flat_map(read_unit, fn_kwargs={"cfg": cfg}, num_cpus=cfg.task_cpus / 2)
    if resources.get("CPU", 0) - actors * cfg.actor_cpus - cfg.task_cpus / 2 >= 1:
        ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
    model_kwargs = {"cfg": cfg, "int8": int8, "model_sha256": model_sha256}
    model_stage = {
        "compute": ray.data.ActorPoolStrategy(size=actors),
        "batch_size": cfg.batch_size,
        "batch_format": "numpy",
        "num_cpus": cfg.actor_cpus,
        "num_gpus": 1 if gpus else 0,
        "accelerator_type": cfg.accelerator_type,  # (named, gpus >= 1: see _gpus)
    }
    if fused:
        ds = ds.map_batches(
            WholeStage,
            fn_constructor_kwargs={**model_kwargs, "provenance": provenance},
            **model_stage,
        )
    else:
        ds = (
            ds.map_batches(
                prepare_stage,
                fn_kwargs={"cfg": cfg, "provenance": provenance["text"]},
                batch_size=None,  # a block at a time, as a task takes it
                batch_format="numpy",
                num_cpus=cfg.task_cpus,
            )
            .map_batches(Colorizer, fn_constructor_kwargs=model_kwargs, **model_stage)
            .map_batches(
                write_stage,
                fn_kwargs={"cfg": cfg, "provenance": provenance},
                batch_size=cfg.batch_size,
                batch_format="numpy",
                num_cpus=cfg.task_cpus,
            )
        )
    done, errors, start, last = 0, 0, time.monotonic(), 0.0
    compactor = manifest.Compactor(cfg.output, cfg.s3)
    split = {_source_text(u["url"]): u for u in units if "part" in u}
    broken = set()  # split archives a part of which broke off
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        compactor.add(batch)
        done += int(sum(s not in manifest.NOT_INPUTS for s in batch["status"]))
        errors += int(sum(s == "error" for s in batch["status"]))
        broken.update(s for s in batch["source"] if s in split)
        now = time.monotonic()
        if now - last > 2.0:
            rate = done / max(now - start, 1e-9)
            print(f"colorize: {done} inputs done ({errors} errors), {rate:.2f} images/s")
            last = now
    compactor.fold()
    _read_through([u for source, u in split.items() if source not in broken], cfg, provenance)
    return done


def _read_through(units: list[dict], cfg: ColorizeConfig, provenance: dict) -> None:
    """The READ rows of the split archives of `units`, each of whose parts was read to its
    end: the row a whole archive's task gives (`read_unit`), here once all its tasks did."""
    rows = [_read_row(u["url"], u["part"]["inputs"], u["size"]) | {"pages": 0} for u in units]
    if rows:
        manifest.write_part([_finish_row(r, cfg, provenance) for r in rows], cfg.output, cfg.s3)


def _check_same_colours(inputs, model_sha256: str, cfg: ColorizeConfig) -> None:
    """Refuses to go on with an OUTPUT whose outputs another model or temperature made (a
    training run's folder as --model names its newest checkpoint, which may have changed):
    the archive would hold colours of two. The manifest's rows say which made each."""
    ok = inputs.filter(pc.equal(inputs.column("status"), "ok"))
    other = pc.or_(
        pc.not_equal(ok.column("model_sha256"), model_sha256),
        pc.not_equal(ok.column("temperature"), cfg.temperature),
    )
    if n := pc.sum(other).as_py():
        first = ok.filter(other).slice(0, 1).to_pylist()[0]
        raise ValueError(
            f"{cfg.output} holds {n} outputs of another model or temperature (model "
            f"{first['model_sha256'][:12]} at {first['temperature']}, this run "
            f"{model_sha256[:12]} at {cfg.temperature}): give another OUTPUT, or the model "
            "and temperature that made them"
        )


def main(cfg: ColorizeConfig) -> Summary:
    from jobs.lease import DriverLease
    from jobs.models import load_model
    from jobs.runtime import check_gpus

    # A local Ray instance has no autoscaler: GPU actors would wait for a GPU forever (one
    # image, in this process, needs one; the actors of a Ray run one each: `_run_on_ray`).
    check_gpus(min(_gpus(cfg, cluster_gpus=0), 1), _gpu_flag(cfg))
    start = time.monotonic()
    cfg = storage.with_absolute_paths(cfg, "input", "output")
    loaded = load_model(cfg.model, cfg.s3)
    cfg = dataclasses.replace(cfg, model=loaded.url)  # a run folder's newest checkpoint: fixed
    provenance = _provenance(loaded.sha256, cfg)
    # its lease beside the manifest, not among the pictures
    leased = storage.join(cfg.output, manifest.WORK_DIR)
    with DriverLease(leased, cfg.s3, what=f"colorize output {cfg.output}"):
        units, top_level, skipped = plan_left(cfg, loaded.sha256)
        print(
            f"colorize: {cfg.input} -> {cfg.output} with {loaded.kind} model {loaded.url} "
            f"(sha256 {loaded.sha256[:12]}), {skipped} inputs already done"
        )
        single = len(top_level) == 1 and _kind(top_level[0]) == "image"
        model = loaded.model.eval()
        if units and cfg.dtype == "int8":  # before any work, and only when there is some
            model = check_int8(model, cfg)
        if units and single:
            processed = _run_in_process(units, cfg, model, provenance)
        elif units:
            int8 = model.plan if isinstance(model, Int8ColorizationNet) else None
            processed = _run_on_ray(units, cfg, provenance, int8, loaded.sha256)
        else:
            processed = 0
        summary = _finish(cfg, top_level, skipped)
        elapsed = time.monotonic() - start
        print(
            f"colorize: {processed} inputs processed in {elapsed:.1f}s "
            f"({processed / max(elapsed, 1e-9):.2f} images/s)"
        )
        return summary


def plan_left(cfg: ColorizeConfig, model_sha256: str) -> tuple[list[dict], list[str], int]:
    """`plan` of the work the runs before this one (the manifest's rows; a killed run's
    included) left, refused where they colorized with another model or temperature."""
    rows = manifest.compact(cfg.output, cfg.s3)  # what a killed run left: read once
    inputs = manifest.inputs_only(rows)
    status = inputs.column("status")
    again = pc.equal(status, "error")  # tried again: with --retry-errors
    if not cfg.retry_errors:  # every one, else those that ran out of memory
        again = pc.and_kleene(again, pc.starts_with(inputs.column("reason"), OUT_OF_MEMORY))
    done = inputs.filter(pc.invert(again))
    _check_same_colours(inputs, model_sha256, cfg)
    read = manifest.archives_read(rows)
    written = set(pc.filter(inputs.column("output"), pc.equal(status, "ok")).to_pylist())
    return plan(cfg, done.column("source").to_pylist(), read, written)


def _finish(cfg: ColorizeConfig, top_level: list[str], skipped: int) -> Summary:
    """Compact the manifest parts, check that every input is accounted for exactly once and
    write the manifest."""
    rows = manifest.compact(cfg.output, cfg.s3)
    table = manifest.inputs_only(rows)
    short = _archives_short(rows, table, top_level)
    status = table.column("status")
    ok, errors = (int(pc.sum(pc.equal(status, s)).as_py() or 0) for s in ("ok", "error"))
    images = pa.array([u for u in top_level if _kind(u) == "image"], pa.string())
    missing = images.filter(pc.invert(pc.is_in(images, table.column("source")))).to_pylist()
    outputs = table.column("output").filter(pc.equal(status, "ok"))
    written = pa.array(_listed_outputs(cfg), pa.string())
    absent = outputs.filter(pc.invert(pc.is_in(outputs, written))).to_pylist()
    repeated = len(outputs) - pc.count_distinct(outputs).as_py()
    print(f"colorize: {table.num_rows} inputs = {ok} outputs + {errors} errors")
    for row in table.filter(pc.equal(status, "error")).slice(0, 10).to_pylist():
        print(f"  error {row['source']}: {row['reason']}")
    if errors > 10:
        print(f"  ... and {errors - 10} more, see the manifest")
    if missing or short or absent or repeated or table.num_rows != ok + errors:
        rerun = "the same command again does what is missing"
        hints = [
            hint
            for hint, applies in (
                (rerun, missing or short),
                ("an output removed since it was written is not made again: its input is done, "
                 "so colorize into a new OUTPUT to have it", absent),
                ("an output written by two inputs holds the later one's colours", repeated),
            )
            if applies
        ]  # fmt: skip
        raise RuntimeError(
            f"accounting failed: {len(missing)} inputs without a manifest row "
            f"{missing[:3]}, {len(short)} archives with fewer member rows than members "
            f"{short[:3]}, {len(absent)} outputs not on storage {sorted(absent)[:3]}, "
            f"{repeated} outputs written by two inputs ({'; '.join(hints or [rerun])})"
        )
    url = storage.join(cfg.output, WORK_DIR, f"manifest.{cfg.manifest_format}")
    buffer = io.BytesIO()
    if cfg.manifest_format == "csv":
        import pyarrow.csv

        pyarrow.csv.write_csv(table, buffer)
    else:
        import pyarrow.parquet as pq

        pq.write_table(table, buffer)
    storage.write_bytes(url, buffer.getvalue(), cfg.s3)
    print(f"colorize: manifest {url}")
    return Summary(table.num_rows, ok, errors, skipped, url, table)


def _archives_short(rows: pa.Table, inputs: pa.Table, top_level: list[str]) -> list[str]:
    """The archives read through (a READ row with their number of members) that have fewer
    member rows among `inputs` than that, each with its counts. Top-level files named like
    an archive's members (``a.zip!x.png`` beside ``a.zip``) are not its members."""
    sources, tops = sorted(inputs.column("source").to_pylist()), sorted(top_level)
    listed, short = set(top_level), []
    for archive, (members, _) in sorted(manifest.archives_read(rows).items()):
        if archive not in listed:  # gone from INPUT: no run reads it again to mend it
            continue
        have = len(_members(archive, _kind(archive), sources, tops))
        if have < members:
            short.append(f"{archive}: {have} of {members}")
    return short


def _listed_outputs(cfg: ColorizeConfig) -> list[str]:
    """Relative paths of the files under OUTPUT, the job's own folder left out. Temporary
    files of local writes cut short by a killed run are removed."""
    base = storage.join(storage.absolute(cfg.output), "")
    found = [u[len(base) :] for u in storage.list_files_swept(cfg.output, cfg.s3)]
    return [r for r in found if not r.startswith(WORK_DIR + "/")]


if __name__ == "__main__":
    from jobs.config import run_job

    run_job("jobs.colorize", "ColorizeConfig", positionals=("input", "output"))
