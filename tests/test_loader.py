"""The training input pipeline: decoding (EXIF orientation), exactly-once epochs across ranks,
resume, shapes and ranges."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import subprocess
import sys
from itertools import islice

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from colorcore.data import crop_box, make_targets, random_crop_flip
from jobs import storage
from jobs.dataset import shard_parquet
from jobs.images import EXIF_ORIENTATION, decode_3hw, load_rgb
from jobs.loader import (
    DatasetIndex,
    TrainLoader,
    crop_seed,
    decode_threads,
    epoch_orders,
    epoch_windows,
)
from tests.support import ROOT, ROW_GROUP_ROWS, encode, photo_rgb, write_dataset


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("loader") / "ds")
    write_dataset(root)
    return root


@pytest.fixture(scope="module")
def dataset(dataset_root) -> DatasetIndex:
    return DatasetIndex.load(dataset_root)


def loader(index: DatasetIndex, rank: int, **kw) -> TrainLoader:
    args = {"world_size": 2, "batch_size": 3, "crop_px": 32, "seed": 7, "window_images": 6} | kw
    return TrainLoader(index, rank=rank, **args)


def test_decode_threads_follow_the_cpus_from_2_to_8() -> None:
    assert [decode_threads(c) for c in (0.5, 1, 3, 4.9, 8, 16, 96)] == [2, 2, 3, 4, 8, 8, 8]


def test_index_leaves_out_grayscale(dataset) -> None:
    assert dataset.num_images == 21
    assert 3 not in dataset.rows[0] and 3 not in dataset.rows[2]  # global rows 3 and 15


def epoch_order(index: DatasetIndex, **kw) -> np.ndarray:
    """The order of one read group."""
    (order,) = epoch_orders(index, **kw)
    return order


def test_epoch_order_is_a_seeded_permutation(dataset) -> None:
    order = epoch_order(dataset, epoch=0, seed=7, window_images=6)
    pairs = {tuple(p) for p in order}
    expected = {(s, r) for s, rows in enumerate(dataset.rows) for r in rows}
    assert len(order) == len(pairs) == 21 and pairs == expected
    again = epoch_order(dataset, epoch=0, seed=7, window_images=6)
    assert np.array_equal(order, again)
    assert not np.array_equal(order, epoch_order(dataset, epoch=1, seed=7, window_images=6))


def test_the_order_is_the_one_runs_started_with(dataset) -> None:
    """A checkpoint's data offset counts in the order its run started with: a resumed run
    must make the same one (this digest was taken before read groups were added; a change
    here needs a retired resume field, see jobs.train.RETIRED_RESUME_FIELDS)."""
    digest = hashlib.sha256()
    for epoch in range(3):
        for window_images in (1, 6, 100):
            order = epoch_order(dataset, epoch=epoch, seed=7, window_images=window_images)
            digest.update(order.astype("<i8").tobytes())
    assert digest.hexdigest()[:32] == "334a634c69a35fbcf3ae988d298030dc"


def test_windows_are_whole_row_groups_of_many_shards(dataset) -> None:
    """The order is cut into windows of whole row groups (at least `window_images` images
    each but the last), each window's images shuffled among themselves; the row groups of a
    window come from across the shards, which is what mixes the classes of a dataset whose
    shards each hold one."""
    units = dataset.units
    assert len(units.shard) == 9 and [len(k) for k in units.kept] == [3, 2, 1, 3, 2, 3, 2, 3, 2]
    order = epoch_order(dataset, epoch=0, seed=7, window_images=6)
    (windows,) = epoch_windows(dataset, np.random.default_rng([7, 0]), 6)
    assert sorted(np.concatenate(windows).tolist()) == list(range(9))  # each unit once
    sizes = [sum(len(units.kept[u]) for u in w) for w in windows]
    assert all(size >= 6 for size in sizes[:-1]) and sum(sizes) == 21
    start = 0
    for window, size in zip(windows, sizes, strict=True):
        rows = {(int(units.shard[u]), int(r)) for u in window for r in units.kept[u]}
        assert {tuple(pair) for pair in order[start : start + size].tolist()} == rows
        start += size
    assert max(len({int(units.shard[u]) for u in w}) for w in windows) >= 3
    unit_of, row_in_group = units.of_rows(order)
    assert np.array_equal(units.first_row[unit_of] + row_in_group, order[:, 1])
    assert np.array_equal(units.shard[unit_of], order[:, 0])


@pytest.fixture
def range_reads(monkeypatch) -> list[int]:
    """The size of each ranged read the loader makes from here on."""
    import jobs.loader

    reads: list[int] = []
    real = storage.read_range

    def counted(url, start, size, s3=None):
        reads.append(size)
        return real(url, start, size, s3)

    monkeypatch.setattr(jobs.loader.storage, "read_range", counted)
    return reads


def test_a_row_group_is_read_in_one_ranged_read_of_its_jpegs(
    dataset, range_reads, monkeypatch
) -> None:
    """Each unit's files are its row group's rows of the shard's jpeg column, read in one
    ranged read of no more than that column chunk (never the whole shard)."""
    import jobs.loader

    reads = range_reads
    monkeypatch.setattr(jobs.loader.storage, "read_bytes", None)  # a whole-file read fails
    train = loader(dataset, 0)
    for u in range(len(dataset.units.shard)):
        reads.clear()
        s, g = int(dataset.units.shard[u]), int(dataset.units.group[u])
        expected = pq.ParquetFile(dataset.shard_urls[s]).read_row_group(g, columns=["jpeg"])
        files = train._read_unit(u)
        assert [bytes(files[i]) for i in range(len(files))] == expected.column(0).to_pylist()
        assert len(reads) == 1 and reads[0] < sum(len(f) for f in files) + 1024


def test_two_ranks_see_every_sample_of_an_epoch_once(dataset) -> None:
    steps = loader(dataset, 0).steps_in_epoch(0)
    assert steps == 21 // 6 == 3  # the remainder of 3 is left out of this epoch
    seen = []
    for rank in (0, 1):
        batches = list(islice(iter(loader(dataset, rank)), steps))
        assert all(b.epoch == 0 for b in batches)
        assert [b.next_offset for b in batches] == [6, 12, 18]
        seen += [int(p) for b in batches for p in b.positions]
        assert batches[0].rgb_N3HW.shape == (3, 3, 32, 32)
        assert batches[0].rgb_N3HW.dtype == torch.uint8
    assert sorted(seen) == list(range(18))  # each position once, over both ranks


def test_resume_from_an_offset_repeats_nothing_and_matches(dataset) -> None:
    full = list(islice(iter(loader(dataset, 1)), 5))  # crosses into epoch 1
    assert [(b.epoch, b.next_offset) for b in full] == [(0, 6), (0, 12), (0, 18), (1, 6), (1, 12)]
    resumed = list(islice(iter(loader(dataset, 1, start_epoch=0, start_offset=12)), 3))
    for a, b in zip(full[2:], resumed, strict=True):
        assert (a.epoch, a.next_offset) == (b.epoch, b.next_offset)
        assert np.array_equal(a.positions, b.positions)
        assert torch.equal(a.rgb_N3HW, b.rgb_N3HW)  # same images, crops and flips
    with pytest.raises(ValueError, match="not a multiple of the global batch"):
        loader(dataset, 0, start_offset=4)
    with pytest.raises(ValueError, match="fewer than one batch"):
        loader(dataset, 0, batch_size=11)


def test_read_groups_each_take_their_own_row_groups(dataset) -> None:
    """Each epoch's row groups are dealt out among the read groups, whole and balanced; every
    group's order is made of its own windows, as one group's is."""
    units = dataset.units
    for epoch in range(4):
        orders = epoch_orders(dataset, epoch=epoch, seed=7, window_images=4, groups=2)
        windows = epoch_windows(dataset, np.random.default_rng([7, epoch]), 4, 2)
        sizes = [len(o) for o in orders]
        assert sum(sizes) == 21 and abs(sizes[0] - sizes[1]) <= 3  # the largest row group
        taken = [set(np.concatenate(w).tolist()) for w in windows]
        assert not taken[0] & taken[1] and taken[0] | taken[1] == set(range(9))
        for order, group_windows in zip(orders, windows, strict=True):
            start = 0
            for window in group_windows:
                rows = {(int(units.shard[u]), int(r)) for u in window for r in units.kept[u]}
                size = len(rows)
                assert {tuple(p) for p in order[start : start + size].tolist()} == rows
                start += size
            assert start == len(order)
    assert not np.array_equal(
        np.concatenate(epoch_orders(dataset, epoch=0, seed=7, window_images=4, groups=2)),
        epoch_order(dataset, epoch=0, seed=7, window_images=4),
    )


def test_the_next_epochs_row_groups_are_read_a_window_ahead(dataset, monkeypatch) -> None:
    """Near an epoch's end the read-ahead runs on into the next epoch's order: its first
    steps' row groups are not read in a burst when it starts."""
    seen: list[tuple[int, list[int]]] = []  # (offset, the row groups read ahead of it)
    real = TrainLoader._read_ahead

    def spy(self, units, unit_of, offset, *args):
        seen.append((offset, unit_of[offset : offset + self._horizon].tolist()))
        return real(self, units, unit_of, offset, *args)

    monkeypatch.setattr(TrainLoader, "_read_ahead", spy)
    train = loader(dataset, 0, world_size=1, window_images=3, prefetch_batches=1)
    steps = train.steps_in_epoch(0)
    with contextlib.closing(iter(train)) as batches:
        list(islice(batches, steps))
    order = epoch_order(dataset, epoch=1, seed=7, window_images=3)
    first = dataset.units.of_rows(order[:3])[0].tolist()  # the next epoch's first batch
    last = seen[steps - 1]  # read ahead of epoch 0's last step
    assert last[0] == (steps - 1) * 3 and len(last[1]) == train._horizon
    assert set(first) <= set(last[1][3:])  # beyond the step itself


def test_read_groups_give_every_rank_its_groups_images_once(dataset, monkeypatch) -> None:
    """Four ranks in two read groups: each sample of an epoch once over all ranks, each rank's
    images from its own group's order at the place its global position says, and reads of
    its own group's row groups only; a resumed rank gives the same batches."""
    import jobs.loader

    kw = {"world_size": 4, "batch_size": 2, "read_groups": 2, "window_images": 4}
    orders = epoch_orders(dataset, epoch=0, seed=7, window_images=4, groups=2)
    steps = loader(dataset, 0, **kw).steps_in_epoch(0)
    assert steps == min(len(o) for o in orders) // 4 == 2
    units = dataset.units
    unit_at = {
        (int(s), dataset.jpeg_range(int(s), int(g))[0]): u
        for u, (s, g) in enumerate(zip(units.shard, units.group, strict=True))
    }
    group_units = [  # epoch by epoch, the positions its steps use (its group's batches of 4):
        # the loaders run a few steps ahead (epochs of 2 steps here), and read a window beyond
        [set(units.of_rows(o[: steps * 4])[0].tolist()) for o in epoch_orders(
            dataset, epoch=e, seed=7, window_images=4, groups=2)]
        for e in range(5)
    ]  # fmt: skip
    columns = [pq.read_table(url, columns=["jpeg"]).column("jpeg") for url in dataset.shard_urls]
    read: set[int] = set()  # units read

    def counted(url, start, size, s3=None):
        read.add(unit_at[dataset.shard_urls.index(url), start])
        return storage.read_bytes(url, s3)[start : start + size]

    monkeypatch.setattr(jobs.loader.storage, "read_range", counted)
    seen = []
    for rank in range(4):
        group = rank // 2
        read.clear()
        batches = list(islice(iter(loader(dataset, rank, **kw)), steps))
        for batch in batches:
            seen += batch.positions.tolist()
            for position, crop in zip(batch.positions, batch.rgb_N3HW, strict=True):
                step, place = divmod(int(position), 8)  # global batch 8, a group's 4
                s, r = orders[group][step * 4 + place - 4 * group]
                rng = np.random.default_rng(crop_seed(7, 0, int(position)))
                image = decode_3hw(columns[s][int(r)].as_py())
                assert torch.equal(crop, random_crop_flip(image, 32, rng))
        own = set().union(*(epoch[group] for epoch in group_units))
        assert group_units[0][group] <= read <= own
        resumed = next(iter(loader(dataset, rank, start_offset=8, **kw)))
        assert np.array_equal(resumed.positions, batches[1].positions)
        assert torch.equal(resumed.rgb_N3HW, batches[1].rgb_N3HW)
    assert sorted(seen) == list(range(steps * 8))
    with pytest.raises(ValueError, match="3 read groups do not divide 4 workers"):
        loader(dataset, 0, **kw | {"read_groups": 3})
    with pytest.raises(ValueError, match=r"in 2 read groups .* the smallest may hold 9, fewer "):
        loader(dataset, 0, **kw | {"batch_size": 5})  # 21 images, row groups of up to 3


def test_validation_crops_are_read_by_row_group_and_shared_out_by_rank(
    dataset, dataset_root, range_reads
) -> None:
    """The held-out crops: the centre crops of n colour images spread over the set
    (`held_out`), rank r taking the r-th of world_size stretches of them; read as the loader
    reads, one ranged read of each row group holding them (never a whole shard)."""
    from jobs.validation import held_out, load_crops

    columns = [pq.read_table(url, columns=["jpeg"]).column("jpeg") for url in dataset.shard_urls]
    chosen = held_out([(s, int(r)) for s, rows in enumerate(dataset.rows) for r in rows], 15)
    reads = range_reads
    for rank, mine in enumerate((chosen[:7], chosen[7:])):
        reads.clear()
        crops = load_crops(dataset_root, num_images=15, crop_px=32, rank=rank, world_size=2)
        expected = [random_crop_flip(decode_3hw(columns[s][r].as_py()), 32, None) for s, r in mine]
        assert torch.equal(crops, torch.stack(expected))
        units = set(dataset.units.of_rows(np.asarray(mine))[0].tolist())
        chunks = [dataset.jpeg_range(int(dataset.units.shard[u]), int(dataset.units.group[u]))
                  for u in units]  # fmt: skip
        assert sorted(reads) == sorted(size for _, size in chunks)  # one read a row group


def test_targets_shapes_and_ranges(dataset) -> None:
    batch = next(iter(loader(dataset, 0, crop_px=48)))
    t = make_targets(batch.rgb_N3HW)
    assert t.l_N1HW.shape == (3, 1, 48, 48) and 0 <= t.l_N1HW.min() and t.l_N1HW.max() <= 100
    assert t.bins_NkHW.shape == (3, 10, 12, 12) and t.bins_NkHW.dtype == torch.int64
    assert 0 <= t.bins_NkHW.min() and t.bins_NkHW.max() < 313
    torch.testing.assert_close(t.weights_NkHW.sum(1), torch.ones(3, 12, 12))
    assert t.nongray_N.dtype == torch.bool and t.nongray_N.all()
    gray = make_targets(batch.rgb_N3HW.float().mean(1, keepdim=True).expand(-1, 3, -1, -1) / 255)
    assert not gray.nongray_N.any()
    # The values: L of every pixel, ab of every 4th encoded with the k and sigma asked for
    from colorcore.color import rgb_to_lab
    from colorcore.quantize import soft_encode

    lab_N3HW = rgb_to_lab(batch.rgb_N3HW.float() / 255)
    bins, weights = soft_encode(lab_N3HW[:, 1:, ::4, ::4], k=5, sigma=2.0)
    t5 = make_targets(batch.rgb_N3HW, k=5, sigma=2.0)
    torch.testing.assert_close(t5.l_N1HW, lab_N3HW[:, :1], rtol=0, atol=1e-4)
    assert torch.equal(t5.bins_NkHW, bins) and t5.bins_NkHW.shape[1] == 5
    torch.testing.assert_close(t5.weights_NkHW, weights)


def test_targets_traced_whole_equal_the_exact_targets(dataset) -> None:
    """What the training step compiles (`make_targets` with the in-table encoding, no graph
    break) gives the targets of the exact encoding: L to its last bits (whether the graph's
    1 x 3 product rounds as the eager one does depends on the CPU's kernels), the same bins,
    their weights to their last bits."""
    rgb_N3HW = next(iter(loader(dataset, 0, crop_px=32))).rgb_N3HW
    exact = make_targets(rgb_N3HW)
    traced = functools.partial(make_targets, in_table=True)
    compiled = torch.compile(traced, backend="aot_eager", fullgraph=True)(rgb_N3HW)
    torch.testing.assert_close(compiled.l_N1HW, exact.l_N1HW, rtol=0, atol=3e-5)  # 4 ulp at 100
    assert torch.equal(compiled.bins_NkHW, exact.bins_NkHW)
    torch.testing.assert_close(compiled.weights_NkHW, exact.weights_NkHW, rtol=0, atol=1e-5)
    assert torch.equal(compiled.nongray_N, exact.nongray_N)


@pytest.mark.parametrize(
    ("orientation", "turns"),
    [(None, 0), (1, 0), (6, -1), (8, 1)],  # 6: shown turned clockwise, 8: anticlockwise
)
def test_decoding_turns_the_image_upright_only_when_exif_says_so(orientation, turns) -> None:
    from PIL import Image

    stored = np.zeros((32, 64, 3), np.uint8)  # four solid blocks: any turn or flip shows
    stored[:16, :32], stored[:16, 32:], stored[16:, :32] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    stored[16:, 32:] = 255
    exif = Image.Exif()
    if orientation is not None:
        exif[EXIF_ORIENTATION] = orientation
    image, gray = load_rgb(encode(stored, exif=exif.tobytes(), subsampling=0))
    shown = np.asarray(image).astype(int)
    expected = np.rot90(stored, k=turns).astype(int)
    assert shown.shape == expected.shape and not gray
    assert np.abs(shown - expected).mean() < 3  # JPEG noise; a wrong turn is ~100 off
    if turns:
        assert EXIF_ORIENTATION not in image.getexif()  # applied, so no longer claimed
    else:
        assert image.format == "JPEG"  # the decoded image itself, not a copy of it


@pytest.mark.parametrize(
    "kind", ["ycbcr", "gray", "progressive", "orientation 6", "trailing bytes", "png"]
)
def test_training_crops_decode_as_the_checked_decoder_does(kind) -> None:
    """The loader's CPU path decodes JPEGs with OpenCV, other files with Pillow: either way
    the crop is `random_crop_flip` of `decode_3hw`'s pixels, to the bit."""
    from PIL import Image

    from jobs.loader import _crop_into

    rgb = photo_rgb("coffee")[:60, :90]
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    data = {
        "ycbcr": lambda: encode(rgb, subsampling=0),
        "gray": lambda: encode(rgb[..., 0]),
        "progressive": lambda: encode(rgb, progressive=True),
        "orientation 6": lambda: encode(rgb, exif=exif.tobytes()),
        "trailing bytes": lambda: encode(rgb) + b"\0" * 7,
        "png": lambda: encode(rgb, "PNG"),
    }[kind]()
    for seed in range(6):  # flips and no flips
        out = torch.empty((3, 48, 48), dtype=torch.uint8)
        _crop_into(out, memoryview(data), np.random.default_rng(seed), "test")
        expected = random_crop_flip(decode_3hw(data), 48, np.random.default_rng(seed))
        assert torch.equal(out, expected)


def test_a_truncated_training_jpeg_is_a_black_crop_not_filled_in(caplog) -> None:
    """Pillow refuses it (OpenCV would fill in what is missing); the crop is black, a grey
    image, which the loss leaves out, and a warning names the file's place."""
    from colorcore.data import make_targets
    from jobs.loader import _crop_into

    data = encode(photo_rgb("coffee")[:60, :90])
    out = torch.full((3, 48, 48), 7, dtype=torch.uint8)
    with caplog.at_level(logging.WARNING, logger="jobs.loader"):
        _crop_into(out, memoryview(data[:-400]), None, "shard-7 row 3")
    assert not out.any() and "shard-7 row 3 does not decode" in caplog.text
    assert "truncated" in caplog.text
    # what the nvJPEG path hands its decoder: whole files only (an empty one fails torch)
    from jobs.images import whole_jpeg

    assert whole_jpeg(memoryview(data)) and not whole_jpeg(memoryview(data[:-400]))
    assert not whole_jpeg(memoryview(b"")) and not whole_jpeg(b"\xff\xd9")
    assert whole_jpeg(data + bytes(10))  # padded with zeros: whole
    for padding in (4094, 4095, 4096, 4097, 3 * 4096 + 1):  # the end marker across blocks
        assert whole_jpeg(data + bytes(padding)) and not whole_jpeg(data[:-1] + bytes(padding))
    assert not make_targets(out[None]).nongray_N.any()  # no weight in the loss


def test_a_training_jpeg_whose_header_claims_a_huge_picture_is_not_decoded(caplog) -> None:
    """Damage to a frame header's size would have OpenCV decode gigabytes for seconds in each
    of the decoding threads at once: a header claiming more pixels than the file's bytes can
    code goes to the checked decoder, which refuses it, and the crop is black."""
    from jobs.images import DEFAULT_MAX_PIXELS, jpeg_size
    from jobs.loader import _crop_into, _jpeg_problem

    data = encode(photo_rgb("coffee")[:60, :90])
    assert jpeg_size(data) == (60, 90) and jpeg_size(b"\x89PNG") is None
    assert _jpeg_problem(memoryview(data)) is None
    frame = data.index(b"\xff\xc0")  # its height and width after the marker, length, precision
    huge = bytearray(data)
    huge[frame + 5 : frame + 9] = (30_000).to_bytes(2, "big") * 2
    assert 30_000**2 > DEFAULT_MAX_PIXELS
    out = torch.full((3, 48, 48), 7, dtype=torch.uint8)
    with caplog.at_level(logging.WARNING, logger="jobs.loader"):
        _crop_into(out, memoryview(bytes(huge)), np.random.default_rng(0), "shard-2 row 9")
    assert not out.any() and "shard-2 row 9 does not decode" in caplog.text
    assert "30000x30000 pixels > limit" in caplog.text  # the checked decoder's refusal
    assert _jpeg_problem(memoryview(bytes(huge))) == (
        f"its frame header gives 30000x30000 pixels, more than {len(huge)} bytes hold"
    )
    # the most a JPEG codes a byte: one bit for each 8x8 block of a uniform picture
    uniform = encode(np.full((512, 512, 3), 128, np.uint8))
    assert 512 * 512 / len(uniform) < 512 and _jpeg_problem(memoryview(uniform)) is None


ON_CUDA = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_held_out_images_are_spread_over_a_set_stored_class_by_class() -> None:
    """1,000 of ImageNet's 50,000 val images stored class by class (50 a class): a prefix
    would be 20 classes; spread, they come from many classes across the whole set, in few
    row groups (64 rows each)."""
    from jobs.validation import held_out

    chosen = held_out(list(range(50_000)), 1_000)
    assert len(chosen) == len(set(chosen)) == 1_000 and chosen == sorted(chosen)
    assert len({i // 50 for i in chosen}) > 60 and chosen[-1] > 45_000
    assert len({i // 64 for i in chosen}) <= 2 * 4 * 16  # 4x the 16 row groups they fill
    assert held_out(list(range(10)), 20) == list(range(10))  # fewer than asked: all
    for rows in range(1, 300):  # nearly all of a small set too: n rows, each once
        for n in {1, rows // 2, rows - 1, max(1, rows - 3)}:
            picked = held_out(list(range(rows)), n)
            assert len(picked) == len(set(picked)) == n, (rows, n)


def test_validation_leaves_out_an_image_that_no_longer_decodes(tmp_path, caplog) -> None:
    """A held-out row damaged since it was prepared (emptied, cut short) is left out of the
    validation crops with a warning; the others are the intact dataset's."""
    from jobs.validation import load_crops

    intact, damaged = str(tmp_path / "intact"), str(tmp_path / "damaged")
    write_dataset(intact)
    write_dataset(damaged)
    index = DatasetIndex.load(damaged)
    shard = index.shard_urls[0]
    table = pq.read_table(shard)
    jpegs = table.column("jpeg").to_pylist()
    emptied, cut = (int(r) for r in index.rows[0][:2])
    jpegs[emptied], jpegs[cut] = b"", jpegs[cut][:40]
    column = table.schema.get_field_index("jpeg")
    damaged_table = table.set_column(column, "jpeg", pa.array(jpegs, pa.binary()))
    storage.write_bytes(shard, shard_parquet(damaged_table, ROW_GROUP_ROWS))
    with caplog.at_level(logging.WARNING, logger="jobs.validation"):
        crops = load_crops(damaged, num_images=12, crop_px=32)
    assert torch.equal(crops, load_crops(intact, num_images=12, crop_px=32)[2:])
    assert caplog.text.count("does not decode") == 2 and shard in caplog.text


@pytest.mark.parametrize("decode", ["pil", "processes", pytest.param("nvjpeg", marks=ON_CUDA)])
def test_a_damaged_shard_row_costs_its_sample_only(tmp_path, caplog, decode) -> None:
    """The run goes on with the same order: the damaged row's crop is black, the others are
    the crops of an intact copy of the dataset; the warning reaches this process's log
    from the decoding processes too."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    intact, damaged = str(tmp_path / "intact"), str(tmp_path / "damaged")
    write_dataset(intact)
    write_dataset(damaged)
    shard = DatasetIndex.load(damaged).shard_urls[0]
    table = pq.read_table(shard)
    jpegs = table.column("jpeg").to_pylist()
    jpegs[0] = jpegs[0][: len(jpegs[0]) // 2]
    column = table.schema.get_field_index("jpeg")
    damaged_table = table.set_column(column, "jpeg", pa.array(jpegs, pa.binary()))
    storage.write_bytes(shard, shard_parquet(damaged_table, ROW_GROUP_ROWS))
    index = DatasetIndex.load(damaged)
    with caplog.at_level(logging.WARNING, logger="jobs.loader"):
        batches = [
            pair
            for rank in (0, 1)  # three epochs on both ranks
            for pair in zip(
                islice(loader(DatasetIndex.load(intact), rank, decode=decode), 9),
                islice(loader(index, rank, decode=decode), 9),
                strict=True,
            )
        ]
    black = 0
    for good, bad in batches:
        assert np.array_equal(good.positions, bad.positions)
        same = (good.rgb_N3HW == bad.rgb_N3HW).flatten(1).all(1)
        assert same.all() or (same.sum() == len(same) - 1 and not bad.rgb_N3HW[~same].any())
        black += int((~same).sum())
    assert black >= 1 and f"{index.shard_urls[0]} row 0 does not decode" in caplog.text


@pytest.mark.parametrize(
    ("damage", "decode"),
    [
        ("cut short", "pil"),
        ("overwritten", "pil"),
        ("cut short on S3", "pil"),
        pytest.param("cut short", "nvjpeg", marks=ON_CUDA),  # empty files: never decoded
    ],
)
def test_a_damaged_row_group_costs_its_samples_only(
    tmp_path, caplog, damage, decode, request
) -> None:
    """A shard changed since it was indexed: the row groups whose bytes no longer read give
    black crops, with a warning naming them, and the run goes on in the same order (a
    resumed run meets them at the same step: it must not fail there again). On S3 a read of
    a row group past the shard's new end is refused (416), after its retries."""
    intact = str(tmp_path / "intact")
    if damage.endswith("S3"):
        damaged = request.getfixturevalue("s3_server").url("damaged-shards")
    else:
        damaged = str(tmp_path / "damaged")
    write_dataset(intact)
    write_dataset(damaged)
    index = DatasetIndex.load(damaged)  # the footers, read while the shard was whole
    shard = index.shard_urls[0]
    start, size = index.jpeg_range(0, 1)
    data = bytearray(storage.read_bytes(shard))
    if damage.startswith("cut short"):
        del data[start + size // 2 :]
    else:
        data[start : start + 24] = bytes(b ^ 0xFF for b in data[start : start + 24])  # header
    storage.write_bytes(shard, bytes(data))
    with caplog.at_level(logging.WARNING, logger="jobs.loader"):
        pairs = list(zip(islice(loader(DatasetIndex.load(intact), 0, decode=decode), 6),
                         islice(loader(index, 0, decode=decode), 6), strict=True))  # fmt: skip
    black = 0
    for good, bad in pairs:
        assert np.array_equal(good.positions, bad.positions)
        same = (good.rgb_N3HW == bad.rgb_N3HW).flatten(1).all(1)
        assert not bad.rgb_N3HW[~same].any()  # a crop that differs is black
        black += int((~same).sum())
    assert black >= 2 and f"{shard} row group 1 (rows 3 on) is damaged" in caplog.text
    if damage == "cut short on S3":  # row group 2 lies past the end: its read is refused
        left_out = "row group 2 (rows 6 on) is damaged, its 1 images left out"
        assert f"{left_out}: the shard is {len(data)} bytes now" in caplog.text


@pytest.mark.parametrize("crop_px", [32, 48])  # 48 > the 40-pixel short side: scaled up first
def test_batches_are_the_seeded_crops_of_the_decoded_images(dataset, crop_px) -> None:
    """Each sample is `random_crop_flip` of the decoded image with its own seeded generator,
    whichever thread decodes it (the exact-resume contract rests on this)."""

    train = loader(dataset, 1, crop_px=crop_px, num_threads=3)
    order = epoch_order(dataset, epoch=0, seed=7, window_images=6)
    columns = [pq.read_table(url, columns=["jpeg"]).column("jpeg") for url in dataset.shard_urls]
    flips = set()
    for batch in islice(iter(train), train.steps_in_epoch(0)):
        for position, crop in zip(batch.positions, batch.rgb_N3HW, strict=True):
            s, r = order[position]
            seed = crop_seed(7, 0, int(position))
            rng = np.random.default_rng(seed)
            flips.add(crop_box(40, 56, crop_px, np.random.default_rng(seed))[2])
            image = decode_3hw(columns[s][int(r)].as_py())
            assert torch.equal(crop, random_crop_flip(image, crop_px, rng))
    assert flips == {False, True}


def test_crop_streams_are_not_the_shuffle_stream() -> None:
    """The first image's crop does not draw the numbers that shuffled its epoch."""
    shuffle = np.random.default_rng([7, 3]).integers(0, 2**62, 4)
    crops = [np.random.default_rng(crop_seed(7, 3, p)).integers(0, 2**62, 4) for p in range(3)]
    assert all(not np.array_equal(c, shuffle) for c in crops)
    assert len({tuple(c) for c in crops}) == 3


@pytest.mark.parametrize("kind", ["binary", "large_binary"])
def test_jpeg_files_are_the_column_values_without_copies_each(kind) -> None:
    """Rows of a shard's column, chunked and sliced as Arrow may hand them over: each file
    is its own bytes, in a buffer torch can take without a copy or a warning."""
    import warnings

    from jobs.loader import JpegFiles

    values = [b"first", b"", b"\xff\xd8third", b"4" * 1000, b"fifth"]
    kind_type = getattr(pa, kind)()
    chunks = [pa.array(values[:2], kind_type), pa.array([b"x", *values[2:]], kind_type).slice(1)]
    files = JpegFiles.of_column(pa.chunked_array(chunks))
    assert len(files) == len(values)
    assert [bytes(files[r]) for r in range(len(files))] == values
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a read-only buffer would warn here
        frame = torch.frombuffer(files[3], dtype=torch.uint8)
    assert frame.numel() == 1000 and not files[1]  # an empty file reads as empty
    assert JpegFiles.of_column(pa.chunked_array([pa.array([b""], kind_type)]))[0].nbytes == 0
    with pytest.raises(ValueError, match="1 nulls"):
        JpegFiles.of_column(pa.chunked_array([pa.array([b"a", None], kind_type)]))
    with pytest.raises(ValueError, match="must be binary"):
        JpegFiles.of_column(pa.chunked_array([pa.array(["text"])]))


def test_device_crops_equal_the_crops_taken_one_by_one() -> None:
    """The nvJPEG path crops a batch at once (flips gathered into one kernel): the same crops
    and flips as `random_crop_flip` image by image, small images scaled up included."""
    from jobs.loader import _device_crops

    gen = torch.Generator().manual_seed(0)
    sizes = [(60 + 7 * i, 40 + 11 * (i % 4)) for i in range(30)] + [(20, 90), (40, 40)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in sizes]

    def rngs() -> list[np.random.Generator]:
        return [np.random.default_rng([3, 1, i]) for i in range(len(images))]

    together = _device_crops(images, 40, rngs())
    one_by_one = torch.stack(
        [random_crop_flip(im, 40, g) for im, g in zip(images, rngs(), strict=True)]
    )
    assert torch.equal(together, one_by_one)
    assert {crop_box(60, 40, 40, g)[2] for g in rngs()} == {False, True}  # both kinds occur
    # an image that did not decode (None) is a black crop, the others as before
    images[3] = None
    with_gap = _device_crops(images, 40, rngs())
    assert not with_gap[3].any() and torch.equal(with_gap[4:], one_by_one[4:])
    assert not _device_crops([None], 40, rngs()[:1], torch.device("cpu")).any()


def test_closing_the_iterator_stops_its_threads(dataset) -> None:
    import threading

    def loader_threads() -> set[threading.Thread]:
        names = ("train-loader", "decode", "shard-read")
        return {t for t in threading.enumerate() if t.name.startswith(names)}

    before = loader_threads()
    batches = iter(loader(dataset, 0, num_threads=2))
    next(batches)
    assert loader_threads() - before
    batches.close()
    assert not loader_threads() - before


def test_decoding_processes_give_the_threads_batches(dataset) -> None:
    """The same samples, crops and flips, to the byte, from 3 steps of 2 ranks (crops of 48
    are scaled up first); the decoders end with the iterator."""

    for rank, crop_px in ((0, 32), (1, 48)):
        before = decoders()
        threads = islice(iter(loader(dataset, rank, crop_px=crop_px, num_threads=2)), 3)
        processes = iter(loader(dataset, rank, crop_px=crop_px, num_threads=2, decode="processes"))
        for a, b in zip(threads, islice(processes, 3), strict=True):
            assert np.array_equal(a.positions, b.positions)
            assert (a.epoch, a.next_offset) == (b.epoch, b.next_offset)
            assert torch.equal(a.rgb_N3HW, b.rgb_N3HW)
        assert len(decoders() - before) >= 2
        processes.close()
        if rank == 1:  # the fork server, started for rank 0, stays; the decoders are gone
            assert decoders() == before
    assert [decode_threads(c, "processes") for c in (0.5, 3, 16)] == [1, 3, 16]
    with pytest.raises(ValueError, match="decode must be one of"):
        loader(dataset, 0, decode="gpu")


def test_decoding_processes_share_batches_that_grow_and_are_freed(tmp_path) -> None:
    """Batches of several tasks each go through shared memory: one smaller than the last
    reuses it, one whose files outgrow it gets it remade; a process never writes into a file
    that is not its batch's (the descriptor number reused); every file descriptor is closed
    at shutdown, of batches gathered or not."""
    import os

    from jobs.loader import PROCESS_TASK_IMAGES, _crop_into, _crops_in_process, _ProcessDecoders

    photo = photo_rgb("chelsea")
    small = [encode(photo[i : i + 40, i : i + 48]) for i in range(20)]
    large = [encode(photo[i : i + 200, :160], quality=100) for i in range(3)]
    assert len(small) > 2 * PROCESS_TASK_IMAGES and sum(map(len, large)) > 1.5 * sum(
        map(len, small[:10])
    )

    def shared_files() -> set[str]:  # by name (Python's mmap holds a descriptor too)
        links = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(FileNotFoundError):  # the listing's own, closed since
                links.append(os.readlink(f"/proc/self/fd/{fd}"))
        return {link for link in links if link.startswith("/memfd:colorcore-loader")}

    def expected(files: list[bytes], seeds: list[list[int]]) -> torch.Tensor:
        out = torch.empty((len(files), 3, 32, 32), dtype=torch.uint8)
        for i, (f, seed) in enumerate(zip(files, seeds, strict=True)):
            _crop_into(out[i], memoryview(f), np.random.default_rng(seed), "")
        return out

    decoders = _ProcessDecoders(2)
    try:
        tokens = []
        for files in (small, small[:10], large):
            seeds = [[5, i] for i in range(len(files))]
            out = torch.empty((len(files), 3, 32, 32), dtype=torch.uint8)
            where = ["x"] * len(files)
            gather = decoders.start([memoryview(f) for f in files], seeds, where, out)
            (shared,) = decoders.made
            tokens.append(shared.token)
            assert torch.equal(gather(), expected(files, seeds))
            assert len(shared_files()) == 1
        assert tokens[0] == tokens[1] != tokens[2]
        for _ in range(2):  # started, never gathered
            decoders.start([memoryview(f) for f in large], [[1]] * 3, ["x"] * 3, out)
        assert len(decoders.made) == len(shared_files()) == 2
    finally:
        decoders.shutdown()
    assert not decoders.made and not shared_files()

    other = tmp_path / "shard"
    other.write_bytes(b"\xff" * 4096)
    with open(other, "rb") as file, pytest.raises(RuntimeError, match="batch 123456 is gone"):
        shared = (f"/proc/self/fd/{file.fileno()}", 123456, 0, [123456])
        _crops_in_process(shared, 0, [0, 10], [[1]], ["x"], 32)
    assert other.read_bytes() == b"\xff" * 4096


def decoders(pid: int | None = None) -> set[int]:
    """The fork server and the decoders forked from it below process `pid` (this one)."""
    import psutil

    below = psutil.Process(pid).children(recursive=True)
    return {p.pid for p in below if "multiprocessing.forkserver" in " ".join(_cmdline(p))}


def _cmdline(process) -> list[str]:
    import psutil

    try:
        return process.cmdline()
    except psutil.Error:  # ended meanwhile
        return []


def test_decoding_processes_end_when_their_loader_is_killed(dataset_root) -> None:
    """SIGKILL leaves a pool no time to stop its processes: they go by themselves."""
    import psutil

    script = f"""
import sys, time
from jobs.loader import DatasetIndex, TrainLoader
if __name__ == "__main__":
    index = DatasetIndex.load({dataset_root!r})
    loader = TrainLoader(index, rank=0, world_size=1, batch_size=3, crop_px=32, seed=7,
                         window_images=6, num_threads=2, decode="processes")
    batches = iter(loader)
    next(batches)
    print("ready", flush=True)
    time.sleep(600)
"""
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             cwd=ROOT)  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "ready"
        below = decoders(child.pid)
        assert len(below) >= 2  # the fork server and the decoders started so far
    finally:
        child.kill()
        child.wait()
    _, alive = psutil.wait_procs([psutil.Process(p) for p in below if psutil.pid_exists(p)],
                                    timeout=10)  # fmt: skip
    assert not alive, [p.pid for p in alive]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvjpeg_batches_match_the_pil_batches(dataset) -> None:
    """Decoded and cropped on the loader's own CUDA stream, used on the consumer's: the same
    samples, crops and flips as with PIL, within the two JPEG decoders' rounding."""
    pil = islice(iter(loader(dataset, 0)), 4)
    nv = islice(iter(loader(dataset, 0, decode="nvjpeg")), 4)
    for a, b in zip(pil, nv, strict=True):
        assert np.array_equal(a.positions, b.positions) and b.rgb_N3HW.is_cuda
        difference = (b.rgb_N3HW.float() - a.rgb_N3HW.cuda().float()).abs()
        assert difference.mean() < 3, float(difference.mean())  # a wrong crop or flip: ~20


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_crops_for_a_gpu_are_pinned_and_the_same(dataset) -> None:
    pageable = islice(iter(loader(dataset, 0)), 3)
    pinned = islice(iter(loader(dataset, 0, pin_memory=True)), 3)
    for a, b in zip(pageable, pinned, strict=True):
        assert b.rgb_N3HW.is_pinned() and not a.rgb_N3HW.is_pinned()
        assert torch.equal(a.rgb_N3HW, b.rgb_N3HW.cuda(non_blocking=True).cpu())


def test_small_images_are_scaled_up_to_the_crop_in_their_own_range() -> None:
    from colorcore.data import random_crop_flip

    levels = torch.arange(48, dtype=torch.uint8).reshape(3, 4, 4) * 5
    up = random_crop_flip(levels, 8, None)
    assert up.dtype == torch.uint8 and up.shape == (3, 8, 8)
    unit = random_crop_flip(levels.float() / 255, 8, None)  # floats in [0, 1] are not rounded
    assert unit.dtype == torch.float32 and len(unit.unique()) > 20 and unit.max() < 1
    torch.testing.assert_close(unit * 255, up.float(), rtol=0, atol=0.5)


@pytest.mark.parametrize("shape", [(9, 14), (5, 40), (30, 3), (1, 1), (7, 7)])
def test_a_small_images_crop_is_that_of_the_whole_image_scaled_up(shape) -> None:
    """Only the crop's pixels of the scaled-up image are computed: the same pixels (to a
    level, rounding aside) as scaling the whole image with F.interpolate and cropping."""
    crop_px, generator = 16, torch.Generator().manual_seed(sum(shape))
    image = torch.randint(0, 256, (3, *shape), dtype=torch.uint8, generator=generator)
    scale = crop_px / min(shape)
    size = tuple(max(crop_px, round(n * scale)) for n in shape)
    whole = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)
    for seed in range(8):
        top, left, flip = crop_box(*size, crop_px, np.random.default_rng(seed))
        expected = whole[0, :, top : top + crop_px, left : left + crop_px]
        expected = expected.flip(-1) if flip else expected
        crop = random_crop_flip(image, crop_px, np.random.default_rng(seed))
        assert crop.dtype == torch.uint8
        torch.testing.assert_close(crop.float(), expected.round().clamp(0, 255), rtol=0, atol=1)
        unit = random_crop_flip(image.float() / 255, crop_px, np.random.default_rng(seed))
        torch.testing.assert_close(unit * 255, expected, rtol=0, atol=1e-3)


def test_a_sliver_of_an_image_crops_without_scaling_all_of_it() -> None:
    """A 1 x 1,000,000 scan scaled up whole to a 176-pixel short side would take 371 GB."""
    sliver = torch.randint(0, 256, (3, 1, 1_000_000), dtype=torch.uint8)
    crop = random_crop_flip(sliver, 176, np.random.default_rng(0))
    assert crop.shape == (3, 176, 176)
    assert torch.equal(crop[:, 0], crop[:, 175])  # one row scaled up: every row the same


def test_eps_files_are_not_opened() -> None:
    """Pillow's EPS reader runs Ghostscript on the file: an archive's EPS is not an image."""
    from jobs.images import BadImage, open_image

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n"
    with pytest.raises(BadImage, match="not an image"):
        open_image(eps)


@pytest.mark.parametrize(
    ("pixel", "gray"),
    [
        ((0, 255, 255), False),  # int8 arithmetic would wrap around
        ((100, 100, 103), False),  # only B off, by 3
        ((100, 102, 100), True),  # within 2 levels
        ((100, 102, 104), False),  # R and B 4 apart, each 2 from G
        ((7, 7, 7), True),
    ],
)
def test_gray_means_every_pair_of_channels_within_two_levels(pixel, gray) -> None:
    """`load_rgb`'s grayscale flag (training leaves gray sources out) on an RGB PNG that is
    mid-gray but for one pixel."""
    rgb = np.full((6, 5, 3), 128, np.uint8)
    rgb[2, 3] = pixel
    assert load_rgb(encode(rgb, "PNG"))[1] is gray


@pytest.mark.parametrize("size", [(300, 200), (257, 513)])
def test_draft_decoding_keeps_the_short_side_asked_for(size) -> None:
    """A large JPEG is decoded at a reduced scale (libjpeg's draft mode), never below the
    short side asked for, and close to the full decode resized."""
    from PIL import Image

    from jobs.images import resize_short_side

    rgb = photo_rgb("coffee")[: size[1], : size[0]]
    data = encode(rgb)
    small, _ = load_rgb(data, min_side_px=64)
    assert min(small.size) >= 64
    full, _ = load_rgb(data)
    reduced = resize_short_side(small, 64)  # the draft may round a side up by a pixel
    a = np.asarray(reduced, np.float64)
    b = np.asarray(full.resize(reduced.size, Image.Resampling.BICUBIC, reducing_gap=3.0), float)
    assert 10 * np.log10(255**2 / np.mean((a - b) ** 2)) > 30
