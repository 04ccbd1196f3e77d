"""Turn a raw image collection into training shards.

``python -m jobs.prepare SRC DST [--short-side-px 256] [--shard-mb 256] [--labels-file FILE]``

SRC (local path or storage URL), detected from its form:

- an image tree ``SRC/<class>/<image>``;
- the ILSVRC2012 train archive as distributed: a tar holding one tar per class;
- a flat folder of images with ``--labels-file`` listing ``<relative path> <int label>`` per
  line (the ImageNet val layout; ``ctest10k.txt`` style lines with a leading ``/`` work too).

DST gets the layout of `jobs.dataset`: Parquet shards of about ``--shard-mb``, images with
their short side reduced to ``--short-side-px`` (JPEG sources decode at reduced scale) and
re-encoded as 4:4:4 JPEG, quality 95; JPEG sources already small enough are kept byte for
byte. Bad inputs (empty, truncated, not images, above ``--max-pixels``) are recorded in
``errors.json`` with their reason: every input gives a row or an error, and the manifest
counts both (rows + errors = inputs).

The inputs are cut into groups in a fixed order; each group is one Ray Data task that writes
its shards and then a marker. A re-run skips groups whose marker exists, so an interrupted
run resumes without redoing or duplicating anything, and produces the same shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import posixpath
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any

from jobs import storage, tars
from jobs.config import cpus_problems, positive_problems
from jobs.crashes import Careful, CrashGuard
from jobs.dataset import (
    SHARD_SCHEMA,
    SHARDS_DIR,
    Manifest,
    ShardInfo,
    shard_parquet,
)
from jobs.images import (
    DEFAULT_MAX_PIXELS,
    JPEG_QUALITY,
    BadImage,
    encode_jpeg,
    exif_orientation,
    jpeg_length,
    load_rgb,
    out_of_memory,
    resize_short_side,
)

WORK_DIR = "_prepare"
ERRORS_FILE = "errors.json"
READ_PROBES = 4  # files read before any work: refused all, the credentials cannot read SRC
TASK_BASE_BYTES = 512 * 2**20  # a conversion task's interpreter, PIL and pyarrow, beyond its data
TASK_RETRIES = 3  # tries of a group whose task was killed, after its first
CONVERT_BYTES_PER_PIXEL = 13
"""Memory `convert` holds at its peak beyond the source bytes, per pixel of the source, as
`bench/convert_memory.py` measured it at 36 MP: 12.2 B for a 32-bit float TIFF, 9.1 for a
PNG with a palette and transparency, 8.1 for RGBA or CMYK, 4.5 for an RGB PNG."""
JPEG_BYTES_PER_PIXEL = 1  # measured 0.3 (RGB, CMYK): decoded at a reduced scale
JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")


OUTPUT_FIELDS = ("short_side_px", "shard_mb", "max_group_images", "max_pixels", "max_file_mb",
                 "jpeg_quality")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class PrepareConfig:
    src: str = ""
    """Image tree, tar of per-class tars, or flat folder (with --labels-file)."""
    dst: str = ""
    """Output dataset folder (local path or storage URL)."""
    labels_file: str | None = None
    """For a flat folder: lines '<relative path> <int label>'."""
    short_side_px: int = 256
    """Images are reduced so that their short side is at most this."""
    shard_mb: float = 256.0
    """Target size of one Parquet shard."""
    max_group_images: int = 2000
    """At most this many images per task (more tasks, more parallelism)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more pixels are refused (decompression bombs)."""
    max_file_mb: float = 256.0
    """Files (and tar members) larger than this are refused before they are read."""
    jpeg_quality: int = JPEG_QUALITY
    """Quality of re-encoded JPEGs."""
    cpus_per_task: float = 1.0
    """CPUs reserved by each conversion task."""
    crash_tries: int = 2
    """Deaths of the task converting an input carefully (a decoder's crash on a malformed
    file, or Ray's memory monitor killing it) after which the input is an error row. A
    group's task is tried 1 + TASK_RETRIES times a run, and the counts last from run to run
    (`jobs.crashes`)."""
    s3: storage.S3Options = field(default_factory=storage.S3Options)

    def __post_init__(self) -> None:
        if not self.src or not self.dst:
            raise ValueError("SRC and DST are required")
        (src_scheme, src), (dst_scheme, dst) = (
            storage.split_url(self.src),
            storage.split_url(self.dst),
        )
        if src_scheme == dst_scheme and (dst + "/").startswith(src.rstrip("/") + "/"):
            raise ValueError("DST must not be SRC or inside it (a re-run would read it)")
        if self.short_side_px < 16:
            raise ValueError(f"short_side_px must be >= 16, got {self.short_side_px}")
        if min(self.max_group_images, self.max_pixels) < 1:
            raise ValueError("max_group_images and max_pixels must be >= 1")
        problems = positive_problems(self, "shard_mb", "max_file_mb")
        if problems := problems + cpus_problems(self, "cpus_per_task"):
            raise ValueError("; ".join(problems))
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.crash_tries < 1:
            raise ValueError(f"crash_tries must be >= 1, got {self.crash_tries}")

    def output_fields(self) -> dict[str, Any]:
        """The fields that decide the shards' content (must match on a resumed run)."""
        return {k: getattr(self, k) for k in OUTPUT_FIELDS}


# ---------------------------------------------------------------- planning: inputs -> groups


def _class_index(classes: list[str]) -> dict[str, int]:
    return {c: i for i, c in enumerate(classes)}


def _hidden(rel: str) -> bool:
    """Whether a path within SRC is hidden (.DS_Store, .ipynb_checkpoints/, ...): left out,
    for a hidden folder taken as a class would shift every label after it."""
    return any(part.startswith(".") for part in rel.split("/"))


def _plan_tree(cfg: PrepareConfig) -> tuple[list[str], list[dict]]:
    found = storage.file_sizes(cfg.src, cfg.s3)
    if hidden := sorted(rel for rel in found if _hidden(rel)):
        print(f"prepare: {len(hidden)} hidden file(s) left out, e.g. {hidden[0]!r}")
    found = {rel: size for rel, size in found.items() if not _hidden(rel)}
    if not found:
        raise ValueError(f"SRC {cfg.src}: no files in it")
    inputs = []
    for rel, size in sorted(found.items()):
        if "/" not in rel:
            raise ValueError(f"{cfg.src}: {rel!r} is not inside a class folder <class>/<image>")
        cls, name = rel.split("/", 1)
        inputs.append(
            {
                "key": f"{cls}/{posixpath.splitext(name)[0]}",  # v1.2/scan: no extension
                "class": cls,
                "url": storage.join(cfg.src, rel),
                "size": size,
            }
        )
    classes = sorted({i["class"] for i in inputs})
    return classes, _chunk(inputs, cfg, _class_index(classes))


def _plan_flat(cfg: PrepareConfig) -> tuple[list[str], list[dict]]:
    labels: dict[str, int] = {}
    text = storage.read_bytes(cfg.labels_file, cfg.s3).decode()
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.strip().rsplit(None, 1)  # the label last: a path may hold spaces
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].isdigit():
            raise ValueError(f"{cfg.labels_file}:{number}: expected '<path> <label >= 0>'")
        rel = posixpath.normpath(parts[0].lstrip("/"))
        if rel == ".." or rel.startswith("../"):
            raise ValueError(f"{cfg.labels_file}:{number}: {parts[0]!r} is outside SRC")
        if rel in labels:
            raise ValueError(f"{cfg.labels_file}:{number}: {parts[0]!r} is listed twice")
        labels[rel] = int(parts[1])
    if not labels:
        raise ValueError(f"{cfg.labels_file} lists no images")
    classes = [str(i) for i in range(max(labels.values()) + 1)]
    found = storage.file_sizes(cfg.src, cfg.s3)
    if list(found) == [""]:
        raise ValueError(
            f"SRC {cfg.src} is a file: with --labels-file it must be the folder of the images "
            "listed (extract an archive first)"
        )
    sizes = {posixpath.normpath(r): n for r, n in found.items()}
    missing = [rel for rel in labels if rel not in sizes]
    if len(missing) == len(labels):
        raise ValueError(
            f"none of the {len(labels)} images {cfg.labels_file} lists is in SRC {cfg.src} "
            f"(such as {missing[0]!r}; SRC holds {len(sizes)} files"
            + (f", such as {min(sizes)!r}" if sizes else "")
            + "): the paths are relative to SRC"
        )
    if missing:
        print(f"prepare: {len(missing)} of the {len(labels)} images {cfg.labels_file} lists are "
              f"not in SRC (such as {missing[0]!r}): recorded as errors")  # fmt: skip
    inputs = [
        {
            "key": f"{label}/{posixpath.splitext(rel)[0]}",  # a/x.jpg and b/x.jpg: two
            "class": str(label),
            "url": storage.join(cfg.src, rel),
            "size": sizes.get(rel, 0),  # listed but missing: its read reports it
        }
        for rel, label in sorted(labels.items())
    ]
    return classes, _chunk(inputs, cfg, _class_index(classes))


def _chunk(inputs: list[dict], cfg: PrepareConfig, index: dict[str, int]) -> list[dict]:
    groups, current, size, keys = [], [], 0, set()
    for item in inputs:
        item["label"] = index[item.pop("class")]
        if item["key"] in keys:  # a.jpg beside a.png: a key names one image
            item["error"] = f"another input has the key {item['key']!r}"
        keys.add(item["key"])
        if current and (len(current) >= cfg.max_group_images or size >= cfg.shard_mb * 2**20):
            groups.append({"kind": "files", "items": current})
            current, size = [], 0
        current.append(item)
        size += item["size"]
    if current:
        groups.append({"kind": "files", "items": current})
    return groups


def _plan_tar_of_tars(cfg: PrepareConfig) -> tuple[list[str], list[dict]]:
    """One group per inner (per-class) tar, found by reading only the outer tar's headers."""
    fs, path = storage.filesystem(cfg.src, cfg.s3, streamed=True)
    # Small blocks: reading each header should not fetch megabytes of the images after it.
    with fs.open(path, "rb", block_size=1 << 16) as f, tars.open_tar(f) as outer:
        listed, damage = tars.listing(outer)
    if damage:  # the classes after the damage would be lost, and the labels after them shift
        raise ValueError(f"{cfg.src}: the tar is damaged {tars.after(listed)} ({damage})")
    members = [m for m in listed if m.isfile()]
    inner = sorted(
        (m for m in members if m.name.endswith(".tar") and not _hidden(posixpath.normpath(m.name))),
        key=lambda m: m.name,
    )
    if not inner:
        raise ValueError(f"{cfg.src}: no per-class .tar members")
    classes = [m.name.rsplit("/", 1)[-1][: -len(".tar")] for m in inner]
    if len(set(classes)) < len(classes):  # their images' keys would be one class's
        twice = sorted(m.name for m, c in zip(inner, classes, strict=True) if classes.count(c) > 1)
        raise ValueError(f"{cfg.src}: class tars of one name in other folders: {twice[:4]}")
    groups = [
        {
            "kind": "tar",
            "url": cfg.src,
            "offset": m.offset_data,
            "size": m.size,
            "class": c,
            "label": i,
        }
        for i, (m, c) in enumerate(zip(inner, classes, strict=True))
    ]
    return classes, groups


def plan(cfg: PrepareConfig) -> tuple[list[str], list[dict]]:
    """(classes, groups) for SRC, in a fixed order."""
    for flag, url in (("SRC", cfg.src), ("--labels-file", cfg.labels_file)):
        if url and not storage.exists(url, cfg.s3):
            raise ValueError(f"{flag} {url}: no such file or folder")
    if cfg.labels_file:
        return _plan_flat(cfg)
    if cfg.src.endswith(".tar"):
        return _plan_tar_of_tars(cfg)
    return _plan_tree(cfg)


# ---------------------------------------------------------------- one group -> shards


def convert(data: bytes, cfg: PrepareConfig) -> tuple[bytes, int, int, bool]:
    """Source bytes -> (jpeg, height_px, width_px, grayscale); raises BadImage."""
    image, gray = load_rgb(data, max_pixels=cfg.max_pixels, min_side_px=cfg.short_side_px)
    from PIL import Image

    source = Image.open(io.BytesIO(data))
    # nothing after its end (a phone's trailer): nvJPEG refuses it; zeros are left out
    length = jpeg_length(data) if source.format == "JPEG" else None
    small_jpeg = (
        length is not None
        and source.mode in ("RGB", "L")
        and source.size == image.size
        and min(source.size) <= cfg.short_side_px
        and exif_orientation(source) == 1  # no EXIF rotation to apply
    )
    if small_jpeg:
        return data[:length], image.height, image.width, gray
    image = resize_short_side(image, cfg.short_side_px)
    return encode_jpeg(image, cfg.jpeg_quality), image.height, image.width, gray


def _group_source(group: dict) -> str:
    """What a group reads: a class tar within the ILSVRC tar, or files."""
    if group["kind"] == "tar":
        return f"{group['url']}!{group['class']}.tar"
    items = group["items"]
    return items[0]["url"] + (f" and {len(items) - 1} more files" if len(items) > 1 else "")


def _group_inputs(group: dict, cfg: PrepareConfig):
    """Yield (key, label, source, bytes or an exception) for every input of the group."""
    if group["kind"] == "files":
        refusals = [
            BadImage(item["error"]) if "error" in item else _too_large(item["size"], cfg)
            for item in group["items"]
        ]
        urls = [
            None if refused else item["url"]
            for item, refused in zip(group["items"], refusals, strict=True)
        ]
        sizes = [item.get("size", 0) for item in group["items"]]
        read = storage.read_each(urls, cfg.s3, sizes=sizes)
        for item, refused, data in zip(group["items"], refusals, read, strict=True):
            if isinstance(data, FileNotFoundError):
                data = BadImage("missing file")
            elif isinstance(data, Exception) and storage.refused_for_good(data):
                data = BadImage(f"unreadable file: {type(data).__name__}: {data}")
            elif isinstance(data, Exception):
                # Other storage errors, left after the retries, and the credentials' (an
                # expired token) fail the task: a re-run of the job reads the group again,
                # where an error row would be final.
                raise data
            yield item["key"], item["label"], item["url"], refused or data
        return
    blob = storage.read_range(group["url"], group["offset"], group["size"], cfg.s3)
    tar_source = _group_source(group)
    try:
        inner = tars.open_tar(io.BytesIO(blob))  # in memory: nothing to close
    except tars.DAMAGE_ERRORS as e:  # not a tar at all: one error row for the class
        yield f"{group['class']}/", group["label"], tar_source, BadImage(f"unreadable tar: {e}")
        return
    listed, damage = tars.listing(inner)
    if listed and listed[-1].offset_data + listed[-1].size > len(blob):
        damage = None  # data that stops inside the last member: that member's own error below
    files = sorted((m for m in listed if not m.isdir()), key=lambda m: m.name)
    keys: set[str] = set()
    for member in files:  # each read apart: a damaged member costs only itself
        key = f"{group['class']}/{member.name.rsplit('/', 1)[-1].rsplit('.', 1)[0]}"
        if not member.isfile():  # a link (hard or symbolic), a device: an input unread
            data: bytes | Exception = BadImage(tars.NOT_A_FILE)
        elif key in keys:
            data = BadImage(f"another member has the key {key!r}")
        else:
            data = _member_bytes(inner, member, cfg)
            keys.add(key)
        yield key, group["label"], f"{tar_source}/{member.name}", data
    if damage:  # the members after it, if any, are lost: the class tar is an error row too
        lost = BadImage(f"unreadable tar {tars.after(listed)}: {damage}")
        yield f"{group['class']}/", group["label"], tar_source, lost


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo, cfg: PrepareConfig):
    """A class tar member's bytes, or a `BadImage` for one above the size limit (unread) or
    one whose bytes are cut short or unreadable."""
    if refused := _too_large(member.size, cfg):
        return refused
    try:
        data = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        return BadImage(f"unreadable tar member: {e}")
    if len(data) != member.size:
        return BadImage(f"unreadable tar member: {len(data)} of {member.size} bytes")
    return data


def _too_large(size: int, cfg: PrepareConfig) -> BadImage | None:
    """The refusal of an input of `size` bytes above ``max_file_mb``, before it is read."""
    return BadImage(f"file too large: {size} bytes") if size > cfg.max_file_mb * 2**20 else None


def _write_part(rows: list[dict], name: str, cfg: PrepareConfig) -> dict:
    import pyarrow as pa

    data = shard_parquet(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA))
    storage.write_bytes(storage.join(cfg.dst, name), data, cfg.s3)
    return {"name": name, "num_rows": len(rows), "sha256": hashlib.sha256(data).hexdigest()}


def process_group(index: int, group: dict, cfg: PrepareConfig) -> dict:
    """Convert one group's inputs, write its shards, then its marker; returns the marker.
    Where an attempt at the group died with its process, each input is converted carefully,
    and one whose conversion killed the process crash_tries times is an error row
    (`jobs.crashes`)."""
    guard = CrashGuard(storage.join(cfg.dst, WORK_DIR, "crashes"), cfg.s3, cfg.crash_tries,
                       doing="converted")  # fmt: skip
    with guard.batch("group", [f"group {index}"]) as careful:
        return _process_group(index, group, cfg, careful)


def _process_group(index: int, group: dict, cfg: PrepareConfig, careful: Careful | None) -> dict:
    parts, rows, errors, size, inputs, gray = [], [], [], 0, 0, 0
    shard_bytes = cfg.shard_mb * 2**20
    for key, label, source, data in _group_inputs(group, cfg):
        inputs += 1
        # The records' reads and writes outside the input's `try`: storage failing them fails
        # the group (a re-run reads it again), not the input.
        read = not isinstance(data, Exception)
        with careful.attempt(source) if careful and read else contextlib.nullcontext() as given_up:
            try:
                if not read:
                    raise data
                if given_up:
                    raise BadImage(given_up)
                jpeg, h, w, is_gray = convert(data, cfg)
            except Exception as e:  # one input's failure, whatever raised it, is its own
                reason = str(e) if isinstance(e, BadImage) else f"{type(e).__name__}: {e}"
                if out_of_memory(e):  # the machine's state, not the image's, said so (failing
                    # the group would fail it on every re-run where this input always runs out)
                    reason = f"ran out of memory converting it ({reason})"
                errors.append({"key": key, "source": source, "reason": reason})
                continue
        gray += is_gray
        rows.append(
            {
                "key": key,
                "label": label,
                "jpeg": jpeg,
                "height_px": h,
                "width_px": w,
                "src_sha256": hashlib.sha256(data).hexdigest(),
                "grayscale": is_gray,
            }
        )
        size += len(jpeg)
        if size >= shard_bytes:
            parts.append(_write_part(rows, _part_name(index, len(parts)), cfg))
            rows, size = [], 0
    if rows:
        parts.append(_write_part(rows, _part_name(index, len(parts)), cfg))
    _remove_parts_beyond(index, len(parts), cfg)
    marker = {"group": index, "inputs": inputs, "grayscale": gray, "parts": parts, "errors": errors}
    storage.write_bytes(_marker_url(cfg, index), json.dumps(marker).encode(), cfg.s3)
    return marker


def _remove_parts_beyond(group: int, count: int, cfg: PrepareConfig) -> None:
    """Removes the group's parts from number `count` on, which an earlier attempt killed
    part-way wrote where this one wrote fewer (an input read then fails now): parts are
    written in turn, so they are the ones found one after another."""
    extra = []
    while storage.exists(
        url := storage.join(cfg.dst, _part_name(group, count + len(extra))), cfg.s3
    ):
        extra.append(url)
    storage.remove(extra, cfg.s3)


def _part_name(group: int, part: int) -> str:
    return f"{SHARDS_DIR}/part-{group:05d}-{part:03d}.parquet"


def _marker_url(cfg: PrepareConfig, group: int) -> str:
    return storage.join(cfg.dst, WORK_DIR, f"group-{group:05d}.json")


# ---------------------------------------------------------------- the job


def _plan_digest(classes: list[str], groups: list[dict]) -> str:
    """Groups are matched to their done-markers by index: a re-run must plan the same (its
    files' URLs spelled one way: SRC given as s3a:// plans as s3://)."""

    def spelled_one_way(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: _canonical(v) if k == "url" else spelled_one_way(v)
                    for k, v in value.items()}  # fmt: skip
        return [spelled_one_way(v) for v in value] if isinstance(value, list) else value

    plan = [classes, spelled_one_way(groups)]
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def _canonical(url: str) -> str:
    """`url` spelled one way: s3://b/train/ and s3a://b/train are one source."""
    scheme, path = storage.split_url(url)
    return path if scheme == "file" else f"{scheme}://{path}"


def _check_resumable(cfg: PrepareConfig, classes: list[str], groups: list[dict]) -> None:
    """Record the output-deciding config and the plan on the first run; refuse a re-run
    whose settings or inputs differ."""
    url = storage.join(cfg.dst, WORK_DIR, "config.json")
    src = _canonical(cfg.src)
    wanted = {"src": src, **cfg.output_fields(), "plan_sha256": _plan_digest(classes, groups)}
    # Created only where absent: of two first runs at once, the second finds the first's
    # (where the store honours the condition: looked for first in any case).
    if not storage.exists(url, cfg.s3) and storage.create_bytes(
        url, json.dumps(wanted).encode(), cfg.s3
    ):
        return
    found = json.loads(storage.read_bytes(url, cfg.s3))
    found["src"] = _canonical(found.get("src", src))
    changed = sorted(k for k in found if found[k] != wanted.get(k))  # keys it recorded
    if changed:
        raise ValueError(
            f"{cfg.dst} was prepared from other {', '.join(changed)} (SRC changed, or other "
            "settings); use a new DST"
        )


def main(cfg: PrepareConfig, *, leased: bool = False) -> Manifest:
    """Convert SRC into the dataset DST, or go on with what a run before left; `leased`: the
    caller holds DST's lease (`jobs.lease`) already."""
    import ray

    from jobs.lease import DriverLease
    from jobs.runtime import check_local_fit, init_ray

    start = time.monotonic()
    cfg = storage.with_absolute_paths(cfg, "src", "dst", "labels_file")
    classes, groups = plan(cfg)
    _check_readable(groups, cfg)
    held = (
        contextlib.nullcontext()
        if leased
        else DriverLease(cfg.dst, cfg.s3, what=f"dataset {cfg.dst}")
    )
    with held:
        _check_resumable(cfg, classes, groups)
        storage.list_files_swept(storage.join(cfg.dst, SHARDS_DIR), cfg.s3)  # a killed run's
        marked = set(storage.list_files_swept(storage.join(cfg.dst, WORK_DIR), cfg.s3))
        todo = [i for i in range(len(groups)) if _marker_url(cfg, i) not in marked]
        print(
            f"prepare: {len(groups)} groups from {cfg.src} ({len(groups) - len(todo)} already done)"
        )
        if todo:
            init_ray(paths=[cfg.src, cfg.dst])
            rows = [{"index": i, "group": json.dumps(groups[i])} for i in todo]
            ds = ray.data.from_items(rows, override_num_blocks=len(rows))
            # A group one block: one that fails (storage errors left after the retries) costs
            # itself, and the others run on instead of being cancelled. (The dataset's own copy
            # of the context: other datasets of the process keep theirs.)
            ds.context.max_errored_blocks = -1
            memory = task_memory(groups, cfg)  # Ray admits no more tasks to a node than fit
            check_local_fit(
                f"a conversion task asks for {cfg.cpus_per_task:g} CPUs (--cpus-per-task) and "
                f"{memory / 2**30:.1f} GiB (`task_memory`)",
                {"CPU": cfg.cpus_per_task, "memory": memory},
                hint="lower --cpus-per-task, --max-pixels or --shard-mb",
            )
            # A task killed (its node lost, or out of memory) is tried again, a few times: Ray
            # Data's default would try one that cannot fit for ever.
            ds.map(
                _process_row, fn_kwargs={"cfg": cfg}, num_cpus=cfg.cpus_per_task, memory=memory,
                max_retries=TASK_RETRIES,
            ).materialize()  # fmt: skip
            marked = set(storage.list_files(storage.join(cfg.dst, WORK_DIR), cfg.s3))
            if failed := [i for i in todo if _marker_url(cfg, i) not in marked]:
                raise RuntimeError(
                    f"prepare: {len(failed)} of {len(groups)} groups failed (their errors are "
                    f"logged above; the first: {_group_source(groups[failed[0]])}): the others "
                    "are done, and the same command again does the rest"
                )
        manifest = _finish(cfg, classes, len(groups))
        print(
            f"prepare: {manifest.num_inputs} inputs -> {manifest.num_rows} images in "
            f"{len(manifest.shards)} shards + {manifest.num_errors} errors "
            f"({manifest.num_grayscale} grayscale) in {time.monotonic() - start:.1f}s -> {cfg.dst}"
        )
        return manifest


def _check_readable(groups: list[dict], cfg: PrepareConfig) -> None:
    """Fails when the first few files to convert all refuse to be read (credentials that
    may list SRC but not read its objects, or not decrypt them): every file would become an
    error row, which a re-run with the right credentials would not read again. A file
    refused among others that read is an error row of its own."""
    items = (item for g in groups if g["kind"] == "files" for item in g["items"])
    urls = list(itertools.islice((i["url"] for i in items if "error" not in i), READ_PROBES))
    refusals = []
    for url in urls:
        try:
            storage.read_range(url, 0, 1, cfg.s3)
            return
        except OSError as error:
            if isinstance(error, FileNotFoundError) or not storage.refused_for_good(error):
                return  # gone since the listing, or the storage's to fail: the groups' own
            refusals.append(error)
    if refusals:
        raise PermissionError(
            f"{cfg.src}: the first {len(urls)} files to convert refuse to be read ({urls[0]}: "
            f"{refusals[0]}): nothing was converted; give credentials that can read them"
        )


def task_memory(groups: list[dict], cfg: PrepareConfig) -> int:
    """Bytes a conversion task may hold at once, asked of Ray for each: its input (a class
    tar whole; files as `storage.read_each` reads them, a window at a time), a shard's rows
    three times over as it is written (the rows, the Arrow table, the Parquet bytes), one
    image at the pixel limit being converted (`CONVERT_BYTES_PER_PIXEL`, or
    `JPEG_BYTES_PER_PIXEL` where every group holds JPEGs by their names: ILSVRC's class
    tars do), and the interpreter. Without the ask a node takes a task per CPU, and a task
    its memory cannot hold is killed and retried for ever."""
    window = storage.READ_EACH_MAX_BYTES
    inputs = max(
        (
            group["size"]
            if group["kind"] == "tar"
            else min(window, sum(i.get("size", 0) for i in group["items"]))
            for group in groups
        ),
        default=0,
    )
    shard = 3 * cfg.shard_mb * 2**20
    per_pixel = max((_convert_bytes_per_pixel(group) for group in groups), default=0)
    return int(inputs + shard + per_pixel * cfg.max_pixels + TASK_BASE_BYTES)


def _convert_bytes_per_pixel(group: dict) -> float:
    if group["kind"] == "tar":  # ILSVRC's: JPEGs
        return JPEG_BYTES_PER_PIXEL
    jpegs = all(i["url"].lower().endswith(JPEG_SUFFIXES) for i in group["items"])
    return JPEG_BYTES_PER_PIXEL if jpegs else CONVERT_BYTES_PER_PIXEL


def _process_row(row: dict, cfg: PrepareConfig) -> dict:
    marker = process_group(row["index"], json.loads(row["group"]), cfg)
    return {"index": row["index"], "rows": sum(p["num_rows"] for p in marker["parts"])}


def _finish(cfg: PrepareConfig, classes: list[str], num_groups: int) -> Manifest:
    urls = [_marker_url(cfg, i) for i in range(num_groups)]
    markers = []
    for url, data in zip(urls, storage.read_each(urls, cfg.s3, ahead=16), strict=True):
        if isinstance(data, Exception):
            raise OSError(f"reading the marker {url} failed: {data}") from data
        markers.append(json.loads(data))
    errors = [e for m in markers for e in m["errors"]]
    manifest = Manifest(
        classes=tuple(classes),
        shards=tuple(ShardInfo(**p) for m in markers for p in m["parts"]),
        num_inputs=sum(m["inputs"] for m in markers),
        num_errors=len(errors),
        num_grayscale=sum(m["grayscale"] for m in markers),
        config={k: v for k, v in dataclasses.asdict(cfg).items() if k != "s3"},
    )
    storage.write_bytes(
        storage.join(cfg.dst, ERRORS_FILE), json.dumps(errors, indent=1).encode(), cfg.s3
    )
    manifest.save(cfg.dst, cfg.s3)
    for e in errors[:10]:
        print(f"  skipped {e['source']}: {e['reason']}")
    if len(errors) > 10:
        print(f"  ... and {len(errors) - 10} more, see {storage.join(cfg.dst, ERRORS_FILE)}")
    return manifest


if __name__ == "__main__":
    from jobs.config import run_job

    run_job("jobs.prepare", "PrepareConfig", positionals=("src", "dst"))
