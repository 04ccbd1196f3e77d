"""The same storage code against the moto S3 endpoint and a local folder."""

from __future__ import annotations

import errno
import http.server
import os
import socket
import stat
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import EndpointConnectionError

from jobs import storage


@pytest.fixture(params=["local", "s3"])
def root_url(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    server = request.getfixturevalue("s3_server")
    return server.url(f"storage-test-{request.node.name.split('[')[0]}")


def test_bytes_round_trip_listing_and_exists(root_url) -> None:
    a, b = storage.join(root_url, "x", "a.bin"), storage.join(root_url, "x/y", "b.txt")
    storage.write_bytes(a, b"\x00\x01")
    storage.write_bytes(b, b"hello")
    storage.write_bytes(b, b"hello again")  # overwrite
    odd = storage.join(root_url, "x", "scan #3?v=2.png")  # characters of a name, not a URL's
    storage.write_bytes(odd, b"odd")
    assert storage.read_bytes(odd) == b"odd" and odd in storage.list_files(root_url)
    storage.remove([odd])
    assert storage.read_bytes(a) == b"\x00\x01"
    assert storage.read_bytes(b) == b"hello again"
    assert storage.exists(a) and not storage.exists(storage.join(root_url, "x", "nope"))
    assert storage.list_files(root_url) == sorted([a, b])
    assert storage.list_files(root_url, suffix=".txt") == [b]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root_url, "missing.bin"))


def test_of_writers_racing_to_create_a_file_one_wins_and_none_overwrites(root_url) -> None:
    from concurrent.futures import ThreadPoolExecutor

    url = storage.join(root_url, "claim", "config.json")
    with ThreadPoolExecutor(8) as pool:
        created = list(pool.map(lambda i: storage.create_bytes(url, b"%d" % i), range(16)))
    assert created.count(True) == 1
    assert storage.read_bytes(url) == b"%d" % created.index(True)
    assert storage.list_files(storage.join(root_url, "claim")) == [url]  # no temporary left
    assert not storage.create_bytes(url, b"late") and storage.read_bytes(url) != b"late"


def test_exclusive_creation_without_hard_links_and_a_bare_412(tmp_path, monkeypatch) -> None:
    """Where a file system refuses hard links, the file is created exclusively instead; an
    S3 412 whose reply names no condition (s3fs then raises a plain OSError) means taken."""
    import errno

    from botocore.exceptions import ClientError

    def no_links(src, dst):
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    url = str(tmp_path / "claim" / "config.json")
    assert storage.create_bytes(url, b"first") and not storage.create_bytes(url, b"second")
    assert storage.read_bytes(url) == b"first" and os.listdir(tmp_path / "claim") == ["config.json"]
    # A write that fails part way (a full disk) leaves no part to be taken for the file
    failing = str(tmp_path / "claim" / "lease.json")
    synced = storage._sync

    def full_disk(fd: int) -> None:  # the temporary file is written, the file itself not
        if os.readlink(f"/proc/self/fd/{fd}") == failing:
            raise OSError(errno.ENOSPC, "no space left on device")
        synced(fd)

    monkeypatch.setattr(storage, "_sync", full_disk)
    with pytest.raises(OSError, match="no space"):
        storage.create_bytes(failing, b"x")
    monkeypatch.undo()
    assert not os.path.exists(failing) and storage.create_bytes(failing, b"again")
    reply = {"Error": {"Code": "PreconditionFailed"}, "ResponseMetadata": {"HTTPStatusCode": 412}}
    bare = OSError(errno.EINVAL, "At least one of the pre-conditions you specified did not hold")
    bare.__cause__ = ClientError(reply, "PutObject")
    assert storage._precondition_failed(bare)
    assert not storage._precondition_failed(OSError(errno.EIO, "reset"))


def test_a_local_name_at_the_file_systems_limit_is_written_as_on_s3(tmp_path) -> None:
    """The temporary name a write takes first keeps within NAME_MAX bytes: a name the file
    system takes is written, created and cached alike."""
    name = "é" * 120 + ".png"  # 244 bytes
    for write in (storage.write_bytes, storage.create_bytes):
        url = str(tmp_path / write.__name__ / name)
        write(url, b"data")
        assert storage.read_bytes(url) == b"data"
        assert os.listdir(tmp_path / write.__name__) == [name]
    temporary = os.path.basename(storage.temporary_beside(str(tmp_path / name)))
    assert len(os.fsencode(temporary)) <= storage.NAME_MAX
    assert storage.STALE_TEMPORARY.search(temporary)


def test_read_each_left_part_way_waits_for_no_read(monkeypatch) -> None:
    """A read_each left before its end may be closed by the garbage collector in a thread
    that is starting up, where joining the pool's threads would deadlock: closing it waits
    for none of the reads under way."""
    release = threading.Event()

    def slow_read(url: str, s3=None) -> bytes:
        if url != "first":
            release.wait(timeout=60)
        return url.encode()

    monkeypatch.setattr(storage, "read_bytes", slow_read)
    reads = storage.read_each(["first", "slow-1", "slow-2"], ahead=3)
    assert next(reads) == b"first"
    start = time.monotonic()
    reads.close()
    assert time.monotonic() - start < 30  # a close that waited would take the reads' 60 s
    release.set()


def test_read_each_and_read_range_give_each_file_in_order(root_url) -> None:
    """Reads overlap, results keep their order; a missing file gives its error in its place,
    a None URL gives None; a range read past the end gives the bytes there are."""
    urls = [storage.join(root_url, "many", f"{i:03d}.bin") for i in range(30)]
    for i, url in enumerate(urls):
        storage.write_bytes(url, bytes([i]) * (i + 1))
    asked = [*urls[:12], None, storage.join(root_url, "many", "missing.bin"), *urls[12:]]
    got = list(storage.read_each(asked, ahead=4))
    assert got[:12] + got[14:] == [bytes([i]) * (i + 1) for i in range(30)]
    assert got[12] is None and isinstance(got[13], FileNotFoundError)
    assert storage.read_range(urls[29], 10, 5) == bytes([29]) * 5
    assert storage.read_range(urls[29], 25, 100) == bytes([29]) * 5
    assert storage.read_range(urls[29], 5, 0) == b""  # not the whole file
    sizes = [i + 1 for i in range(30)]  # from a listing: at most 40 bytes of files at once
    held, most, lock, real = [0, 0], [0, 0], threading.Lock(), storage.read_bytes

    def counting(url, s3=None):
        size = sizes[urls.index(url)]
        with lock:
            held[0], held[1] = held[0] + size, held[1] + 1  # bytes, reads
            most[:] = max(most[0], held[0]), max(most[1], held[1])
        time.sleep(0.05)
        try:
            return real(url, s3)
        finally:
            with lock:
                held[0], held[1] = held[0] - size, held[1] - 1

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(storage, "read_bytes", counting)
        got = list(storage.read_each(urls, sizes=sizes, max_bytes=40))
    assert got == [bytes([i]) * (i + 1) for i in range(30)] and most[0] <= 40
    assert most[1] >= 2  # the reads overlap
    with pytest.raises(ValueError):  # a size for each URL, or none
        list(storage.read_each(urls, sizes=sizes[:5]))


def test_listings_are_not_kept_and_spell_urls_as_given(root_url) -> None:
    """A listing leaves nothing in s3fs's cache, below the folder either (a kept listing
    answers later reads of files written since as missing), and its URLs are spelled as
    the folder's, so that they equal `join` of it (s3a:// stays s3a://)."""
    files = [storage.join(root_url, "d", "sub", f"{i}.bin") for i in range(3)]
    for url in files:
        storage.write_bytes(url, b"x")
    storage.write_bytes(storage.join(root_url, "d", "top.bin"), b"xyz")
    fs, path = storage.filesystem(root_url)
    assert storage.list_files(storage.join(root_url, "d")) == sorted(
        [*files, storage.join(root_url, "d", "top.bin")]
    )
    assert not [k for k in getattr(fs, "dircache", {}) if k.startswith(path)]
    sizes = storage.file_sizes(storage.join(root_url, "d") + "/")
    assert sizes == {"sub/0.bin": 1, "sub/1.bin": 1, "sub/2.bin": 1, "top.bin": 3}
    by_url = storage.sized_files(storage.join(root_url, "d"))  # as list_files spells them
    assert by_url == {url: 1 for url in files} | {storage.join(root_url, "d", "top.bin"): 3}
    assert not [k for k in getattr(fs, "dircache", {}) if k.startswith(path)]
    # s3a:// stays s3a://; a file:// URL, or a relative path, stays so
    if root_url.startswith("s3://"):
        others = ["s3a://" + root_url[len("s3://") :]]
    else:
        others = ["file://" + root_url, os.path.relpath(root_url)]
    for other in others:
        assert storage.list_files(storage.join(other, "d", "sub")) == [
            storage.join(other, "d", "sub", f"{i}.bin") for i in range(3)
        ]


def test_s3_folder_placeholders_are_not_listed_as_files(s3_server) -> None:
    """The empty ``a/`` objects consoles and sync tools make for folders are not files."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    root = "placeholders"
    for key in (f"{root}/", f"{root}/cat/", f"{root}/cat/a.jpg"):
        client.put_object(Bucket=s3_server.bucket, Key=key, Body=b"x" * key.endswith(".jpg"))
    fs, path = storage.filesystem(s3_server.url(root))
    assert any(p.endswith("/") for p in fs.find(path))  # what s3fs gives
    assert storage.list_files(s3_server.url(root)) == [s3_server.url(root, "cat", "a.jpg")]
    assert storage.file_sizes(s3_server.url(root)) == {"cat/a.jpg": 1}
    # A key with "//" (a tool that joined with a trailing slash): listed as it is
    client.put_object(Bucket=s3_server.bucket, Key=f"{root}/cat//b.jpg", Body=b"yy")
    doubled = s3_server.url(root) + "/cat//b.jpg"
    assert storage.sized_files(s3_server.url(root))[doubled] == 2
    assert storage.read_bytes(doubled) == b"yy"


def test_only_refusals_of_the_file_itself_are_final() -> None:
    """s3fs raises PermissionError for an object refused to everyone and for credentials
    that failed (an expired token): only the first is the file's, for good."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    def s3_error(code: str) -> BaseException:
        reply = {"Error": {"Code": code, "Message": code}}
        return translate_boto_error(ClientError(reply, "GetObject"))

    for code in ("AccessDenied", "InvalidObjectState"):
        assert isinstance(s3_error(code), PermissionError) and storage.refused_for_good(
            s3_error(code)
        )
    for code in ("ExpiredToken", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        assert isinstance(s3_error(code), PermissionError)
        assert not storage.refused_for_good(s3_error(code)), code
    assert storage.refused_for_good(PermissionError(13, "Permission denied"))  # local
    assert storage.refused_for_good(FileNotFoundError()) and storage.refused_for_good(
        IsADirectoryError()
    )
    assert not storage.refused_for_good(ConnectionResetError())


def test_a_killed_writers_temporary_files_are_swept(root_url) -> None:
    """Locally, the temporaries `write_bytes` names are removed where their writer, a
    process of this machine, has ended (a killed process's), and left out of the listing
    where it runs (another job's write in progress) or is another machine's (a folder
    machines share: its process ids are not this one's) until a day old; names that only
    look alike, and anything on S3 (one request a write), are files."""
    import subprocess

    ended = subprocess.Popen(["true"])
    ended.wait()
    names = ("a.jpg", "b.tmp-x", "c.tmp-12-zz", "d.tmp-12-123456789", "e.tmp-1-2-3-4")
    kept = [storage.join(root_url, "s", n) for n in names]
    [stale, stale_unnamed] = [  # written by this machine, the second in the older form
        storage.join(root_url, "s", f"{n}.tmp-{m}{ended.pid}-1f3a")
        for n, m in (("a.jpg", f"{storage.MACHINE}-"), ("b.jpg", ""))
    ]
    assert storage.temporary_beside("f.jpg").startswith(f"f.jpg.tmp-{storage.MACHINE}-")
    writing = storage.temporary_beside(storage.join(root_url, "s", "f.jpg"))
    other = f"{int(storage.MACHINE, 16) ^ 1:08x}"
    elsewhere = storage.join(root_url, "s", f"g.jpg.tmp-{other}-{ended.pid}-2b")
    day_old = storage.join(root_url, "s", f"h.jpg.tmp-{other}-{os.getpid()}-3c")  # its pid
    for url in [*kept, stale, stale_unnamed, writing, elsewhere, day_old]:  # here: not it
        storage.write_bytes(url, b"x")
    swept = storage.list_files_swept(storage.join(root_url, "s"))
    if storage.is_local(root_url):
        assert swept == sorted(kept)
        assert storage.list_files(root_url) == sorted([*kept, writing, elsewhere, day_old])
        old = time.time() - storage.OTHER_MACHINES_WRITE_S - 60
        os.utime(storage.split_url(day_old)[1], (old, old))  # another machine's, left a day
        assert storage.list_files_swept(storage.join(root_url, "s")) == sorted(kept)
        assert storage.list_files(root_url) == sorted([*kept, writing, elsewhere])
    else:
        assert swept == sorted([*kept, stale, stale_unnamed, writing, elsewhere, day_old])


def test_remove_deletes_the_files_named_and_no_other(root_url, monkeypatch) -> None:
    # S3 takes 1,000 keys a request (moto takes more): requests of 100 here, for time
    assert storage.DELETE_OBJECTS_MAX_KEYS == 1000
    monkeypatch.setattr(storage, "DELETE_OBJECTS_MAX_KEYS", 100)
    urls = [storage.join(root_url, "r", f"{i:04d}.bin") for i in range(203)]  # > 2 requests
    urls += [storage.join(root_url, "r[1]", "x*.bin"), storage.join(root_url, "r1", "xy.bin")]
    fs, root = storage.filesystem(root_url)
    fs.pipe({storage.filesystem(url)[1]: b"x" for url in urls})  # in one call: many at once
    assert storage.list_files(root_url) == sorted(urls)
    fs.find(root)  # s3fs now holds the listings in its cache
    deletes: list[int] = []
    if hasattr(fs, "call_s3"):
        call = fs.call_s3

        def counting(method, *args, **kwargs):
            if method == "delete_objects":
                deletes.append(len(kwargs["Delete"]["Objects"]))
            return call(method, *args, **kwargs)

        monkeypatch.setattr(fs, "call_s3", counting)
    storage.remove([*urls[1:-1], storage.join(root_url, "r", "never-written.bin")])
    if root_url.startswith("s3://"):
        assert deletes == [100, 100, 4]
    assert not storage.exists(urls[1])  # not from a stale cached listing
    assert storage.list_files(root_url) == [urls[0], urls[-1]]  # names are not patterns
    storage.remove(urls[1:3])  # gone already: not an error
    storage.remove([])


def test_keys_s3_would_not_delete_fail_the_removal(s3_server, monkeypatch) -> None:
    """s3fs's bulk delete drops DeleteObjects' per-key errors: a key left behind must fail."""
    url = s3_server.url("refused", "k.bin")
    storage.write_bytes(url, b"x")
    fs, _ = storage.filesystem(url)
    replies = iter([
        {"Errors": [{"Key": "refused/k.bin", "Code": "AccessDenied", "Message": "no"}]},
        {"Errors": [{"Key": "refused/k.bin", "Code": "NoSuchKey"}]},  # gone already: fine
        {"Errors": [{"Key": "refused/k.bin", "Code": "SlowDown"}]},  # sent again, then done
        {},
    ])  # fmt: skip
    monkeypatch.setattr(fs, "call_s3", lambda method, **request: next(replies))
    with pytest.raises(PermissionError, match=r"1 of 1 objects .* AccessDenied no"):
        storage.remove([url])
    storage.remove([url])
    storage.remove([url])
    assert next(replies, "all taken") == "all taken"


def test_a_local_write_that_fails_half_way_leaves_the_old_file(tmp_path, monkeypatch) -> None:
    """Readers see the old content or the new, never part of it, and no stray file stays:
    here the disk fills as the new content is flushed (where a full disk often shows)."""
    url = str(tmp_path / "f.bin")
    storage.write_bytes(url, b"old")

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        storage.write_bytes(url, b"new content")
    assert storage.read_bytes(url) == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_a_file_system_that_cannot_sync_is_written_unsynced(tmp_path, monkeypatch) -> None:
    """A FUSE mount whose fsync answers EINVAL or ENOSYS takes writes as before; a sync that
    fails for want of space or with EIO fails the write (the other test)."""
    url = str(tmp_path / "f.bin")

    def cannot(fd: int) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(os, "fsync", cannot)
    storage.write_bytes(url, b"content")
    assert storage.create_bytes(url + ".2", b"more")
    assert storage.read_bytes(url) == b"content" and storage.read_bytes(url + ".2") == b"more"


def test_a_local_write_is_on_disk_before_it_is_published(tmp_path, monkeypatch) -> None:
    """The new content is synced before the rename (or link) that gives it its name, and the
    folder after it: a machine that crashes then keeps the file whole under its name, never
    empty, and a job's later records (a manifest part after its outputs) never outlive it.
    The folders the write makes are synced into their parents first, outermost first."""
    calls = []
    real = {name: getattr(os, name) for name in ("fsync", "replace", "link")}

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        calls.append(("folder", st.st_ino) if stat.S_ISDIR(st.st_mode) else "file")
        real["fsync"](fd)

    def folder(path) -> tuple[str, int]:
        return "folder", os.stat(path).st_ino

    monkeypatch.setattr(os, "fsync", fsync)
    for name in ("replace", "link"):
        monkeypatch.setattr(os, name, lambda *a, _n=name: (calls.append(_n), real[_n](*a))[1])
    new = tmp_path / "new" / "deeper"
    storage.write_bytes(str(new / "a.bin"), b"content")
    made = [folder(tmp_path), folder(new.parent)]  # the entries of "new", then of "deeper"
    assert calls == [*made, "file", "replace", folder(new)]
    calls.clear()
    assert storage.create_bytes(str(new / "b.bin"), b"content")
    assert calls == ["file", "link", folder(new)]
    assert (new / "a.bin").read_bytes() == b"content"


def test_pyarrow_filesystem_reads_what_fsspec_wrote(root_url) -> None:
    table = pa.table({"key": ["a", "b"], "v": [1, 2]})
    fs, path = storage.arrow_filesystem(storage.join(root_url, "t.parquet"))
    fs.create_dir(path.rsplit("/", 1)[0])
    pq.write_table(table, path, filesystem=fs)
    # the fsspec side sees the same object
    data = storage.read_bytes(storage.join(root_url, "t.parquet"))
    assert pq.read_table(pa.BufferReader(data)).equals(table)


def test_s3_endpoint_from_options_overrides_environment(s3_server, monkeypatch) -> None:
    url = s3_server.url("endpoint-test.bin")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")  # nothing listens there
    options = storage.S3Options(endpoint_url=s3_server.endpoint_url)
    storage.write_bytes(url, b"ok", options)
    assert storage.read_bytes(url, options) == b"ok"
    fs, path = storage.arrow_filesystem(url, options)
    with fs.open_input_stream(path) as f:
        assert f.read() == b"ok"


def test_split_url_forms(tmp_path) -> None:
    assert storage.split_url("s3://bucket/a/b/") == ("s3", "bucket/a/b")
    assert storage.split_url("gs://bucket/a") == ("gs", "bucket/a")
    assert storage.split_url("s3://b/photo #3?v=2.png") == ("s3", "b/photo #3?v=2.png")
    assert storage.split_url("S3://b/k") == ("s3", "b/k")
    assert storage.split_url(f"file://{tmp_path}/p #3.png") == ("file", f"{tmp_path}/p #3.png")
    assert storage.split_url(f"file://{tmp_path}/x") == ("file", f"{tmp_path}/x")
    assert storage.split_url(f"file:{tmp_path}/run #2?v=1") == ("file", f"{tmp_path}/run #2?v=1")
    assert storage.split_url("rel/x") == ("file", os.path.join(os.getcwd(), "rel/x"))
    with pytest.raises(ValueError, match="unsupported storage URL"):
        storage.split_url("ftp://host/x")
    with pytest.raises(ValueError, match="no bucket"):
        storage.split_url("s3:///x")
    with pytest.raises(ValueError, match=r"^'s3:///x\?\*\*\*': no bucket$"):  # no signature shown
        storage.split_url("s3:///x?X-Amz-Signature=SECRET")
    assert storage.split_url(f"file://localhost{tmp_path}/x") == ("file", f"{tmp_path}/x")
    with pytest.raises(ValueError, match="credentials"):
        storage.S3Options(endpoint_url="http://user:pw@host:9000")
    # s3fs would take a path, pyarrow (Ray's checkpoint uploads) the host and port only
    for endpoint in ("https://gw.example/s3", "http://host:9000/?x=1", "ftp://host",
                     "http://host:abc", "http://host:99999"):  # fmt: skip
        with pytest.raises(ValueError, match=r"must be http\(s\)://host\[:port\]"):
            storage.S3Options(endpoint_url=endpoint)
    assert storage.S3Options(endpoint_url="http://host:9000/").endpoint_url == "http://host:9000/"


def test_credentials_in_urls_are_refused_without_echoing_them(monkeypatch) -> None:
    secret = "wJalrXUtnFEMI"
    for url in (f"s3://AKIAEXAMPLE:{secret}@bucket/key", f"s3://AKIAEXAMPLE:wJal/{secret}@b/k"):
        with pytest.raises(ValueError, match="must not carry credentials") as refused:
            storage.split_url(url)
        assert secret not in str(refused.value)
    for url in (
        f"https://user:{secret}@host/x",
        f"file://user:{secret}@host/x",
        f"https://user:wJal/{secret}@host/x",
        f"file://user:a/{secret}@host/x",
        f"minio:{secret}@host:9000/bucket",  # no scheme's slashes
        f"https://bucket.s3.amazonaws.com/a.tar?X-Amz-Signature={secret}",  # presigned
    ):
        with pytest.raises(ValueError) as refused:
            storage.split_url(url)
        assert secret not in str(refused.value)
    for endpoint in (f"minio:{secret}@host:9000", f"https://host:9000/?X-Amz-Token={secret}"):
        with pytest.raises(ValueError, match=r"must not carry credentials|must be http") as refused:
            storage.S3Options(endpoint_url=endpoint)
        assert secret not in str(refused.value)
    with pytest.raises(ValueError, match="names a host"):  # not ./data/x
        storage.split_url("file://data/x")
    assert storage.split_url("s3://bucket/me@home.jpg") == ("s3", "bucket/me@home.jpg")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://user:{secret}@127.0.0.1:9000")
    with pytest.raises(ValueError, match=r"\$AWS_ENDPOINT_URL_S3 must not carry") as refused:
        storage.S3Options().resolved_endpoint()
    assert secret not in str(refused.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000")
    assert storage.S3Options().resolved_endpoint() == "http://127.0.0.1:9000"


def test_transient_errors_are_retried_and_permanent_ones_are_not() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "done"

    assert storage.with_retries(flaky, what="flaky", base_delay_s=0.001) == "done"
    assert len(calls) == 3

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("gone")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        storage.with_retries(missing, what="missing", base_delay_s=0.001)
    assert len(calls) == 1

    def always_down() -> None:
        calls.append(1)
        raise TimeoutError("timed out")

    def endpoint_unreachable() -> str:  # what s3fs passes on from botocore as it is
        calls.append(1)
        if len(calls) < 2:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        return "done"

    calls.clear()
    assert storage.with_retries(endpoint_unreachable, what="s3", base_delay_s=0.001) == "done"

    calls.clear()
    with pytest.raises(TimeoutError):
        storage.with_retries(always_down, what="down", attempts=4, base_delay_s=0.001)
    assert len(calls) == 4


@pytest.mark.parametrize("value", ["0", "-1", "three"])
def test_a_bad_number_of_storage_attempts_is_said_so(monkeypatch, value) -> None:
    monkeypatch.setenv("COLORCORE_STORAGE_ATTEMPTS", value)
    with pytest.raises(ValueError, match=f"COLORCORE_STORAGE_ATTEMPTS must be .* got '{value}'"):
        storage.with_retries(lambda: None, what="a call")


class _FailingStore(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that fails every request: throttling (503 SlowDown) or, with
    `hang_up`, closing the connection without a reply. It counts the requests."""

    hang_up = False
    requests: list[str]

    def _fail(self) -> None:
        self.requests.append(self.command)
        if self.hang_up:
            self.close_connection = True
            return
        body = b"<Error><Code>SlowDown</Code><Message>Reduce your rate.</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Length", str(len(body) if self.command != "HEAD" else 0))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = _fail

    def log_message(self, *args) -> None:
        pass


def test_storage_is_reachable_where_its_bucket_is(s3_server, monkeypatch, tmp_path) -> None:
    """Asked with a listing of the run folder's own prefix, which a role allowed only that
    prefix may make (not of the bucket, which it may not)."""
    storage.check_reachable(str(tmp_path / "not-yet"))
    with pytest.raises(ValueError, match=r"s3://no-such-bucket/runs is not reachable \(no bu"):
        storage.check_reachable("s3://no-such-bucket/runs")
    fs, _ = storage.filesystem(s3_server.url())
    asked = []
    call = fs.call_s3

    def recording(method, *args, **kwargs):
        asked.append((method, kwargs))
        return call(method, *args, **kwargs)

    monkeypatch.setattr(fs, "call_s3", recording)
    storage.check_reachable(s3_server.url("team-a", "runs"))  # nothing written there yet
    assert asked == [("list_objects_v2", {"Bucket": s3_server.bucket, "Prefix": "team-a/runs",
                                          "MaxKeys": 1})]  # fmt: skip


@pytest.mark.parametrize("hang_up", [False, True])
def test_a_failing_store_is_asked_as_often_as_with_retries_tries(monkeypatch, hang_up) -> None:
    """One retry layer: s3fs and botocore each make a request once, so a store that keeps
    failing gets `RETRY_ATTEMPTS` requests per call, not their product with theirs."""
    handler = type("Store", (_FailingStore,), {"hang_up": hang_up, "requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setattr(storage, "RETRY_ATTEMPTS", 3)
    monkeypatch.setattr(storage, "RETRY_DELAY_S", (0.001, 0.001))
    s3 = storage.S3Options(endpoint_url=f"http://127.0.0.1:{server.server_address[1]}")
    try:
        calls = (storage.read_bytes, lambda url, s3: storage.write_bytes(url, b"x", s3),
                 storage.check_reachable)  # fmt: skip
        for call in calls:
            handler.requests.clear()
            with pytest.raises(Exception) as failed:
                call("s3://bucket/a.bin", s3)
            assert storage.is_transient(failed.value)
            # aiohttp sends a request a connection closed on without a reply once more
            # (RFC 9112 9.3.1), on its own: a closed connection, not a failing store
            assert 3 <= len(handler.requests) <= (6 if hang_up else 3), handler.requests
    finally:
        server.shutdown()
        server.server_close()


def test_a_range_s3_refuses_is_not_asked_for_again(s3_server, monkeypatch) -> None:
    """S3 answers a range past an object's end with InvalidRange (s3fs: OSError EINVAL): a
    refusal of the request, raised at once rather than after a round of back-off."""
    url = f"s3://{s3_server.bucket}/range/short.bin"
    storage.write_bytes(url, b"0123456789")
    pauses = []
    monkeypatch.setattr(storage.time, "sleep", pauses.append)
    with pytest.raises(OSError) as refused:
        storage.read_range(url, 100, 5)
    assert refused.value.errno == errno.EINVAL and pauses == []
    assert not storage.is_transient(OSError(errno.EINVAL, "invalid argument"))  # a local one

    def s3_error(code: str | None, status: int) -> OSError:  # as s3fs raises S3's replies
        from botocore.exceptions import ClientError
        from s3fs.errors import translate_boto_error

        reply = {"Error": {"Code": code} if code else {}}
        reply["ResponseMetadata"] = {"HTTPStatusCode": status}
        return translate_boto_error(ClientError(reply, "PutObject"))

    refused = [("EntityTooLarge", 400), ("PermanentRedirect", 301), ("NotImplemented", 501),
               ("InvalidToken", 400), (None, 400),
               ("AuthorizationHeaderMalformed", 400)]  # fmt: skip
    for code, status in refused:
        assert not storage.is_transient(s3_error(code, status)), code
    passing = [("IncompleteBody", 400), ("XAmzContentSHA256Mismatch", 400),
               ("RequestTimeout", 400), ("SlowDown", 503), ("BandwidthLimitExceeded", 400),
               ("InternalError", 500), (None, 502), ("TooManyRequests", 429)]  # fmt: skip
    for code, status in passing:  # a transfer damaged on the way, a store busy: again
        assert storage.is_transient(s3_error(code, status)), code
    assert storage.is_transient(OSError(errno.EIO, "InternalError"))

    import ssl

    from botocore.exceptions import SSLError

    bad_certificate = SSLError(endpoint_url="https://s3.test", error=ssl.SSLCertVerificationError())
    assert not storage.is_transient(bad_certificate)
    cut_short = SSLError(endpoint_url="https://s3.test", error=ssl.SSLEOFError())  # a busy store
    assert storage.is_transient(cut_short)
    # Refused for good, but the storage's doing, not an archive member's bytes' (colorize)
    assert storage.from_storage(bad_certificate) and storage.from_storage(s3_error(None, 400))


def test_a_folders_special_files_are_left_out_of_its_listing(tmp_path, caplog) -> None:
    """A named pipe among a folder's files would make its reader wait for ever."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "photo.jpg").write_bytes(b"x")
    os.mkfifo(tmp_path / "a" / "pipe.jpg")
    (tmp_path / "a" / "x-loop.jpg").symlink_to("x-loop.jpg")  # read, and an error, as a file
    (tmp_path / "a" / "to-pipe.jpg").symlink_to("pipe.jpg")  # a link to a special file
    (tmp_path / "a" / "zero.jpg").symlink_to("/dev/zero")
    with caplog.at_level("WARNING", logger="jobs.storage"):
        assert storage.list_files(str(tmp_path)) == [
            str(tmp_path / "a" / "photo.jpg"), str(tmp_path / "a" / "x-loop.jpg"),
        ]  # fmt: skip
        assert storage.file_sizes(str(tmp_path)) == {"a/photo.jpg": 1, "a/x-loop.jpg": 0}
    assert "pipe.jpg" in caplog.text


def test_pyarrow_s3_refusals_are_not_retried_and_its_network_failures_are(
    s3_server, monkeypatch
) -> None:
    """pyarrow's S3 filesystem (the manifest's Parquet, Ray's reads) raises plain OSErrors
    naming the AWS SDK's error type: a refusal fails at once, not after minutes of back-off."""
    import pyarrow.fs

    pauses = []
    monkeypatch.setattr(storage.time, "sleep", pauses.append)
    fs, _ = storage.arrow_filesystem(s3_server.url())
    with pytest.raises(OSError, match="AWS Error NO_SUCH_BUCKET during") as refused:
        storage.with_retries(lambda: fs.open_output_stream("no-such-bucket-x/a").close(),
                             what="write")  # fmt: skip
    assert pauses == [] and not storage.is_transient(refused.value)
    unreachable = pyarrow.fs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{_closed_port()}", scheme="http", region="us-east-1",
        retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=1),
    )  # fmt: skip
    with pytest.raises(OSError, match="AWS Error NETWORK_CONNECTION during") as down:
        unreachable.open_input_file("bucket/a")
    assert storage.is_transient(down.value)
    status = "When reading 'k': AWS Error [code 99] (HTTP status {}) during GetObject operation"
    assert storage.is_transient(OSError(status.format(503)))
    assert not storage.is_transient(OSError(status.format(403)))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
