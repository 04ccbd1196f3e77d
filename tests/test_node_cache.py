"""Row groups shared by the training workers of one machine: read from storage once, the
same batches as without sharing, and folders that go away with their runs."""

from __future__ import annotations

import collections
import errno
import logging
import os
import subprocess
import sys
import threading
import time
from itertools import islice

import numpy as np
import pyarrow as pa
import pytest
import torch

import jobs.loader
from jobs import node_cache
from jobs.loader import DatasetIndex, JpegFiles, TrainLoader
from jobs.node_cache import FOLDER_PREFIX, NodeCache, sweep
from tests.support import write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> DatasetIndex:
    root = str(tmp_path_factory.mktemp("node-cache") / "ds")
    write_dataset(root)
    return DatasetIndex.load(root)


@pytest.fixture(autouse=True)
def roomy_disk(monkeypatch) -> None:
    """The tests' folders lie on whatever disk the machine has, of which a quarter (the
    cache's floor) need not be free: every folder reads as empty, a terabyte in size, unless
    a test says otherwise."""
    monkeypatch.setattr(
        node_cache.shutil, "disk_usage", lambda _: shutil_usage(1 << 40, 0, 1 << 40)
    )


@pytest.fixture
def reads(monkeypatch) -> collections.Counter:
    """(shard URL, first byte) of each ranged read the loader makes from storage."""
    counted: collections.Counter = collections.Counter()
    real = jobs.loader.storage.read_range

    def read_range(url, start, size, s3=None):
        counted[url, start] += 1
        return real(url, start, size, s3)

    monkeypatch.setattr(jobs.loader.storage, "read_range", read_range)
    return counted


def open_cache(root, run="run", *, rank=0, workers=2) -> NodeCache:
    cache = NodeCache.open(
        run, local_rank=rank, local_world_size=workers, need_bytes=1, roots=(str(root),)
    )
    assert cache is not None
    return cache


def test_a_restarted_runs_workers_delete_what_killed_writers_left(tmp_path) -> None:
    first = open_cache(tmp_path)
    gone = subprocess.Popen(["true"])  # a writer's pid, no longer alive
    gone.wait()
    dead = os.path.join(first.folder, f"unit-1.tmp-{gone.pid}-7")
    live = os.path.join(first.folder, f"unit-2.tmp-{os.getpid()}-7")
    for path in (dead, live):
        with open(path, "wb") as f:
            f.write(b"half a row group")
    second = open_cache(tmp_path, rank=1)  # joins the folder, as a restarted worker does
    assert second.folder == first.folder
    assert not os.path.exists(dead) and os.path.exists(live)


def files_of(*values: bytes) -> JpegFiles:
    return JpegFiles.of_column(pa.chunked_array([pa.array(list(values), pa.binary())]))


def contents(files: JpegFiles) -> list[bytes]:
    return [bytes(files[r]) for r in range(len(files))]


def batches(index, rank, steps, cache=None, **kw) -> list[torch.Tensor]:
    args = {"world_size": 2, "batch_size": 3, "crop_px": 32, "seed": 7, "window_images": 6} | kw
    loader = TrainLoader(index, rank=rank, cache=cache, **args)
    iterator = iter(loader)
    try:
        return [b.rgb_N3HW for b in islice(iterator, steps)]
    finally:
        iterator.close()


def run_ranks(index, caches, steps, **kw) -> list[list[torch.Tensor]]:
    """The batches of both ranks, their loaders running at once, as a machine's workers do."""
    out: list = [None, None]

    def rank(r: int) -> None:
        out[r] = batches(index, r, steps, caches[r], **kw)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_the_workers_of_a_machine_read_each_row_group_once(dataset, reads, tmp_path) -> None:
    """Two workers' loaders over the same windows: without sharing each reads every row group
    it needs; with it each row group is read once, and the batches are the same crops."""
    kw = {"window_images": 100}  # one window: nothing is dropped, so counts are exact
    alone = run_ranks(dataset, [None, None], 6, **kw)
    alone_reads = dict(reads)
    assert set(alone_reads.values()) == {2}  # every row group, by both workers
    reads.clear()
    caches = [open_cache(tmp_path, rank=r) for r in (0, 1)]
    shared = run_ranks(dataset, caches, 6, **kw)
    for cache in caches:
        cache.close()
    assert set(reads.values()) == {1} and set(reads) == set(alone_reads)
    for a, b in zip(alone, shared, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not os.listdir(tmp_path)  # the last worker to close deleted the folder


def test_windows_dropped_and_read_again_give_the_same_batches(dataset, reads, tmp_path) -> None:
    """Small windows over three epochs: row groups are dropped (their files deleted) and read
    again the next epoch; the crops stay those of loaders without sharing, in fewer reads."""
    kw = {"batch_size": 1}  # a horizon of 14 images, in a dataset of 21
    steps = 3 * 10
    alone = run_ranks(dataset, [None, None], steps, **kw)
    alone_reads = sum(reads.values())
    reads.clear()
    caches = [open_cache(tmp_path, rank=r) for r in (0, 1)]
    shared = run_ranks(dataset, caches, steps, **kw)
    for cache in caches:
        cache.close()
    for a, b in zip(alone, shared, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert max(reads.values()) > 1  # dropped, deleted and read again for a later epoch
    assert sum(reads.values()) < alone_reads


def test_one_row_group_wanted_by_many_at_once_is_read_once(tmp_path) -> None:
    caches = [open_cache(tmp_path, rank=r, workers=4) for r in range(4)]
    calls, asking = [], threading.Semaphore(0)

    def read() -> JpegFiles:
        calls.append(1)
        for _ in range(4 if len(calls) == 1 else 0):  # the others asked too, and wait
            asking.acquire(timeout=10)
        time.sleep(0.05)
        return files_of(b"\xff\xd8one", b"", b"two")

    def ask(r: int) -> None:
        asking.release()
        got[r] = caches[r].get("k-0", read, 3)

    got: list = [None] * 4
    threads = [threading.Thread(target=ask, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert all(contents(files) == [b"\xff\xd8one", b"", b"two"] for files in got)
    frame = torch.frombuffer(got[1][0], dtype=torch.uint8)  # writable: no copy, no warning
    frame[0] = 0  # copy-on-write: the others' files are untouched
    assert contents(got[2])[0] == b"\xff\xd8one"
    caches[0].drop("k-0")
    assert caches[1].get("k-0", read, 3) is not None and len(calls) == 2  # dropped: read again
    caches[0].close()  # others still use the folder: it stays, and serves them
    assert contents(caches[2].get("k-0", read, 3))[2] == b"two" and len(calls) == 2
    for cache in caches[1:]:
        cache.close()
    assert not os.listdir(tmp_path)


def test_the_reader_keeps_the_shared_copy_written_whole(tmp_path, monkeypatch) -> None:
    """The worker that read a row group gets the mapped file too (its own copy is freed),
    and the file appears only once written whole (under a temporary name until then)."""
    cache = open_cache(tmp_path)
    path = os.path.join(cache.folder, "k-0")
    seen, real_save = [], JpegFiles.save

    def save(self, f) -> None:
        seen.append(os.path.exists(path))
        real_save(self, f)

    monkeypatch.setattr(JpegFiles, "save", save)
    mine = files_of(b"a", b"bc")
    got = cache.get("k-0", lambda: mine, 2)
    assert got is not mine and contents(got) == [b"a", b"bc"] and seen == [False]
    cache.close()


def test_a_damaged_row_groups_stand_in_is_not_kept(tmp_path) -> None:
    """Empty files for every row (`DatasetIndex.read_jpegs` of a shard cut short): the
    other workers, and later attempts, ask storage again rather than take black crops."""
    cache, calls = open_cache(tmp_path), []

    def read() -> JpegFiles:
        calls.append(1)
        return files_of(b"", b"") if len(calls) == 1 else files_of(b"\xff\xd8a", b"b")

    assert contents(cache.get("k-0", read, 2)) == [b"", b""]
    assert contents(cache.get("k-0", read, 2)) == [b"\xff\xd8a", b"b"] and len(calls) == 2
    assert contents(cache.get("k-0", read, 2)) == [b"\xff\xd8a", b"b"] and len(calls) == 2
    cache.close()


def test_a_root_of_exactly_the_size_needed_is_used(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(node_cache, "_size", lambda root: 1000)
    cache = NodeCache.open(
        "r", local_rank=0, local_world_size=2, need_bytes=1000, roots=(str(tmp_path),)
    )
    assert cache is not None
    cache.close()


def test_the_descriptor_limit_is_raised_towards_the_hard_one(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(node_cache.resource, "getrlimit", lambda _: (1024, 1 << 20))
    monkeypatch.setattr(node_cache.resource, "setrlimit", lambda _, limits: calls.append(limits))
    node_cache._raise_descriptor_limit()
    assert calls == [(node_cache.DESCRIPTORS, 1 << 20)]
    calls.clear()
    monkeypatch.setattr(node_cache.resource, "getrlimit", lambda _: (1 << 17, 1 << 20))
    node_cache._raise_descriptor_limit()  # already above: left alone
    assert calls == []


def test_a_row_group_dropped_while_being_read_is_deleted_after_its_read(dataset, tmp_path):
    """A dropped row group's file is deleted a few steps later (the other workers' loaders
    may be that far behind), and only once its read is over: a read still going would save
    it again after the delete."""
    from concurrent.futures import ThreadPoolExecutor

    cache = open_cache(tmp_path)
    train = TrainLoader(
        dataset, rank=0, world_size=2, batch_size=1, crop_px=32, seed=7, window_images=6,
        cache=cache,
    )  # fmt: skip
    gate, fetch = threading.Event(), train._fetch_unit
    train._fetch_unit = lambda u: gate.wait(10) and fetch(u)
    key, lag = train._unit_key(0), (2 * train.prefetch_batches + 4) * train.global_batch
    saved = os.path.join(cache.folder, key)
    dropped: collections.deque = collections.deque()
    with ThreadPoolExecutor(1) as pool:
        dropped.append((0, pool.submit(train._read_unit, 0), key))
        train._delete_dropped(dropped, lag)
        assert len(dropped) == 1  # still being read
        gate.set()
    assert os.path.exists(saved)
    train._delete_dropped(dropped, lag - 1)
    assert os.path.exists(saved) and len(dropped) == 1  # too recent yet
    train._delete_dropped(dropped, lag)
    assert not os.path.exists(saved) and not dropped
    cache.close()


def test_a_damaged_or_foreign_file_is_read_again(tmp_path, caplog) -> None:
    """A file that is not saved JPEG files, or not of the row group's number of rows (left by
    an earlier run of the same name over another dataset), is read again and replaced."""
    import io

    cache = open_cache(tmp_path)
    other = io.BytesIO()
    files_of(b"a", b"b").save(other)
    for damage in (b"", b"\x05" + b"\0" * 7 + b"short", other.getvalue()):
        with open(os.path.join(cache.folder, "k-1"), "wb") as f:
            f.write(damage)
        with caplog.at_level(logging.WARNING, "jobs.node_cache"):
            files = cache.get("k-1", lambda: files_of(b"good"), 1)
        assert contents(files) == [b"good"] and "damaged" in caplog.text
        assert contents(cache.get("k-1", lambda: files_of(b"not read"), 1)) == [b"good"]
        caplog.clear()
    path = os.path.join(cache.folder, "k-9")
    with open(path, "wb") as f:
        f.write(b"junk")
    assert cache._mapped(path, 1) is None and not os.path.exists(path)  # deleted at once
    cache.close()


def test_a_full_folder_loses_nothing(tmp_path, monkeypatch, caplog) -> None:
    """Out of space, a row group is not saved and the next one tries again; a folder that
    cannot be written for another reason is not tried again. Nothing partial is left."""
    cache = open_cache(tmp_path)
    saves = []
    real_save = JpegFiles.save

    def failing(code):
        def save(self, f) -> None:
            saves.append(code)
            f.write(b"partial")
            raise OSError(code, os.strerror(code))

        return save

    with caplog.at_level(logging.WARNING, "jobs.node_cache"):
        monkeypatch.setattr(JpegFiles, "save", failing(errno.ENOSPC))
        assert contents(cache.get("k-2", lambda: files_of(b"a"), 1)) == [b"a"]
        assert contents(cache.get("k-3", lambda: files_of(b"b"), 1)) == [b"b"]
        assert saves == [errno.ENOSPC] * 2 and caplog.text.count("is full") == 1
        monkeypatch.setattr(JpegFiles, "save", failing(errno.EDQUOT))  # out of quota: the same
        cache.get("k-quota", lambda: files_of(b"q"), 1)
        saves.pop()
        monkeypatch.setattr(JpegFiles, "save", real_save)
        cache.get("k-4", lambda: files_of(b"c"), 1)  # room again: saved
        assert os.path.exists(os.path.join(cache.folder, "k-4"))
        monkeypatch.setattr(JpegFiles, "save", failing(errno.EROFS))
        for key in ("k-5", "k-6"):
            assert contents(cache.get(key, lambda: files_of(b"d"), 1)) == [b"d"]
    assert saves[2:] == [errno.EROFS] and "cannot be written" in caplog.text
    assert [n for n in os.listdir(cache.folder) if not n.startswith(".")] == ["k-4"]
    cache.close()


def test_a_row_group_that_cannot_be_kept_is_read_without_waiting(tmp_path) -> None:
    """Where nothing can be saved, each worker reads for itself at once: none waits on
    another's read of the same row group only to read it again after."""
    caches = [open_cache(tmp_path, rank=r, workers=2) for r in range(2)]
    for cache in caches:
        cache._saving = False  # as after a failure other than space
    first_reading, release = threading.Event(), threading.Event()

    def slow_read() -> JpegFiles:
        first_reading.set()
        release.wait(timeout=60)
        return files_of(b"slow")

    slow = threading.Thread(target=lambda: caches[0].get("k-0", slow_read, 1))
    slow.start()
    try:
        assert first_reading.wait(timeout=10)
        done = []
        other = threading.Thread(
            target=lambda: done.append(caches[1].get("k-0", lambda: files_of(b"x"), 1))
        )
        other.start()
        other.join(timeout=30)  # (a get that waited for the first would take its 60 s)
        assert done and contents(done[0]) == [b"x"]  # while the first still reads
    finally:
        release.set()
        slow.join()
        for cache in caches:
            cache.close()


def test_a_quarter_of_the_folder_or_the_object_store_is_kept_free(tmp_path, monkeypatch, caplog):
    """Ray's object store lives in /dev/shm too, and dies of a full one: row groups are not
    saved while less than a quarter of it (or the object store's size, where larger) would
    stay free, and are again once there is."""
    free = [1000]
    monkeypatch.setattr(
        node_cache.shutil, "disk_usage", lambda _: shutil_usage(1000, 1000 - free[0], free[0])
    )
    cache = open_cache(tmp_path)
    big = files_of(b"x" * 100)
    for room, saved in ((340, False), (350, True)):  # 100 bytes to save, 250 kept free
        free[0] = room
        with caplog.at_level(logging.WARNING, "jobs.node_cache"):
            cache.get(f"k-{room}", lambda: big, 1)
        assert os.path.exists(os.path.join(cache.folder, f"k-{room}")) == saved
    assert "short of space" in caplog.text
    cache.close()
    reserved = NodeCache.open(
        "r",
        local_rank=0,
        local_world_size=2,
        need_bytes=1,
        reserve_bytes=600,
        roots=(str(tmp_path),),
    )  # the object store's 600 of the 1000 bytes kept free, more than a quarter
    free[0] = 690
    reserved.get("k-690", lambda: big, 1)
    free[0] = 700
    reserved.get("k-700", lambda: big, 1)
    assert sorted(n for n in os.listdir(reserved.folder) if n.startswith("k-")) == ["k-700"]
    reserved.close()


def shutil_usage(total: int, used: int, free: int):
    import shutil

    return shutil._ntuple_diskusage(total, used, free)


def test_a_folder_not_of_this_user_alone_is_not_used(tmp_path, caplog, monkeypatch) -> None:
    """/dev/shm is writable by everyone and the folder's name is known: one made by another
    user (or open to others) is not used, nor are files planted in it."""
    folder = tmp_path / node_cache.folder_name("run")
    folder.mkdir(mode=0o777)
    os.chmod(folder, 0o777)
    with caplog.at_level(logging.WARNING, "jobs.node_cache"):
        cache = NodeCache.open(
            "run", local_rank=0, local_world_size=2, need_bytes=1, roots=(str(tmp_path),)
        )
    assert cache is None and "not a folder of this user's alone" in caplog.text
    os.chmod(folder, 0o700)  # private, but another user's
    monkeypatch.setattr(node_cache.os, "getuid", lambda: 12345)
    assert (
        NodeCache.open(
            "run", local_rank=0, local_world_size=2, need_bytes=1, roots=(str(tmp_path),)
        )
        is None
    )


def test_saved_files_load_back_and_damaged_ones_are_refused() -> None:
    import io

    for values in ([b"x", b"", b"yz" * 100], [], [b""]):
        buffer = io.BytesIO()
        files_of(*values).save(buffer)
        data = bytearray(buffer.getvalue())
        assert contents(JpegFiles.load(memoryview(data))) == values
        for cut in (data[:-1], data + b"!", data[:7]):
            if values or len(cut) < len(data):
                with pytest.raises(ValueError, match="not saved JPEG files"):
                    JpegFiles.load(memoryview(cut))
    for ends in ([1, 2, 3], [0, 3, 1, 3]):  # not from 0, or going back: the right total size
        header = np.asarray([len(ends) - 1, *ends], "<i8").tobytes()
        with pytest.raises(ValueError, match="not saved JPEG files"):
            JpegFiles.load(memoryview(bytearray(header + b"x" * 3)))


def test_workers_start_on_different_row_groups(tmp_path) -> None:
    caches = [open_cache(tmp_path, rank=r, workers=3) for r in range(3)]
    firsts = [cache.spread(list(range(7)))[0] for cache in caches]
    assert firsts == [0, 2, 4]
    assert all(sorted(cache.spread(list(range(7)))) == list(range(7)) for cache in caches)
    for cache in caches:
        cache.close()


def test_no_cache_for_one_worker_or_without_room(tmp_path, caplog) -> None:
    assert NodeCache.open("r", local_rank=0, local_world_size=1, need_bytes=1) is None
    with caplog.at_level(logging.WARNING, "jobs.node_cache"):
        huge = NodeCache.open(
            "r", local_rank=0, local_world_size=2, need_bytes=1 << 60, roots=(str(tmp_path),)
        )
    assert huge is None and "read every row group each" in caplog.text
    roots = (str(tmp_path / "not-there"), str(tmp_path))
    cache = NodeCache.open("r", local_rank=1, local_world_size=2, need_bytes=1, roots=roots)
    assert cache is not None and cache.folder.startswith(str(tmp_path))  # the missing one passed
    cache.close()


def test_folders_of_runs_that_died_are_swept_and_live_ones_kept(tmp_path) -> None:
    """A worker killed outright leaves its folder behind; the next run on the machine deletes
    it, but never the folder of a run whose workers still hold it."""
    script = (
        "import os, signal, sys\n"
        "from jobs.node_cache import NodeCache\n"
        "c = NodeCache.open('dead', local_rank=0, local_world_size=2, need_bytes=1,"
        " roots=(sys.argv[1],))\n"
        "open(os.path.join(c.folder, 'k-0'), 'wb').write(b'x' * 100)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=False)
    assert done.returncode == -9
    (dead,) = os.listdir(tmp_path)
    again = open_cache(tmp_path, "dead")  # the same run again: its folder and files kept
    assert os.path.exists(os.path.join(again.folder, "k-0")) and os.listdir(tmp_path) == [dead]
    again.close()
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=False)
    assert done.returncode == -9 and os.listdir(tmp_path) == [dead]
    live = open_cache(tmp_path, "live")
    assert os.listdir(tmp_path) == [os.path.basename(live.folder)]  # the dead one swept
    other = open_cache(tmp_path, "other")
    assert sorted(os.listdir(tmp_path)) == sorted(
        os.path.basename(c.folder) for c in (live, other)
    )  # the live one kept
    assert sweep(str(tmp_path)) == [] and dead.startswith(FOLDER_PREFIX)
    making = tmp_path / f"{FOLDER_PREFIX}being-made"
    making.mkdir()  # no users file yet: kept
    assert sweep(str(tmp_path)) == [] and making.exists()
    for cache in (live, other):
        cache.close()
    assert sorted(os.listdir(tmp_path)) == [making.name]


def test_a_folder_swept_while_joining_is_made_again(tmp_path, monkeypatch) -> None:
    """The sweep of another run may delete a folder between a worker making it and locking
    its users file: the worker makes it again instead of using a deleted folder."""
    real_flock = node_cache.fcntl.flock
    swept = []

    def flock(fd, operation):
        if operation == node_cache.fcntl.LOCK_SH and not swept:
            swept.append(sweep(str(tmp_path)))  # before this worker holds its lock
        return real_flock(fd, operation)

    monkeypatch.setattr(node_cache.fcntl, "flock", flock)
    cache = open_cache(tmp_path)
    assert swept == [[os.path.basename(cache.folder)]]
    assert os.path.isdir(cache.folder) and sweep(str(tmp_path)) == []
    assert contents(cache.get("k-0", lambda: files_of(b"a"), 1)) == [b"a"]
    cache.close()


def test_every_dropped_row_group_due_is_deleted_at_once(dataset, tmp_path) -> None:
    from concurrent.futures import Future

    cache = open_cache(tmp_path)
    train = TrainLoader(dataset, rank=0, world_size=2, batch_size=1, crop_px=32, seed=7,
                        cache=cache)  # fmt: skip
    dropped: collections.deque = collections.deque()
    for u in range(3):
        cache.get(train._unit_key(u), lambda u=u: files_of(b"x"), 1)
        done: Future = Future()
        done.set_result(None)
        dropped.append((u, done, train._unit_key(u)))
    train._delete_dropped(dropped, 10**6)
    assert not dropped and not [n for n in os.listdir(cache.folder) if not n.startswith(".")]
    cache.close()


def test_a_row_groups_key_changes_with_its_shard(dataset) -> None:
    """A shard rewritten at the same URL (another size) gives its row groups other keys."""
    import dataclasses

    train = TrainLoader(dataset, rank=0, world_size=2, batch_size=1, crop_px=32, seed=7)
    grown = dataclasses.replace(dataset, sizes=tuple(n + 1 for n in dataset.sizes))
    again = TrainLoader(grown, rank=0, world_size=2, batch_size=1, crop_px=32, seed=7)
    assert train._unit_key(0) != again._unit_key(0)
    keys = {train._unit_key(u) for u in range(len(dataset.units.shard))}
    assert len(keys) == len(dataset.units.shard)  # one per row group


def test_the_mean_jpeg_size_is_the_stored_bytes_per_row(dataset) -> None:
    import pyarrow.parquet as pq

    sizes = [
        len(v)
        for url in dataset.shard_urls
        for v in pq.read_table(url, columns=["jpeg"]).column(0).to_pylist()
    ]
    assert dataset.jpeg_bytes_per_image == pytest.approx(np.mean(sizes), rel=0.05)
