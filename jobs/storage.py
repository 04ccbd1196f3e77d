"""Storage URLs -> filesystems, for fsspec and pyarrow alike.

A URL is a local path (``/data/imagenet``, ``file:///data``), ``s3://bucket/key`` or
``gs://bucket/key``. S3-compatible endpoints (MinIO, Ceph, a local test server) come from
`S3Options.endpoint_url` or, when that is unset, the standard ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` environment variables. Credentials are never part of a config (configs
are saved in checkpoints and search state): they come from the environment or the instance
role, through each library's own credential chain.

Reads and writes on object storage retry transient errors (connection drops, throttling,
time-outs) with exponential backoff; missing files and permission errors fail at once. That
retry (`with_retries`) is the only one: s3fs and botocore make each request once, so a hung
or unreachable endpoint fails after `RETRY_ATTEMPTS` tries of s3fs's connect and read
time-outs, where the three layers' retries multiplied would take over half an hour.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import functools
import hashlib
import itertools
import logging
import os
import random
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlparse

if TYPE_CHECKING:
    import fsspec
    import pyarrow.fs

log = logging.getLogger(__name__)
T = TypeVar("T")
C = TypeVar("C")

_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
READ_EACH_MAX_BYTES = 256 * 2**20  # bytes `read_each` holds read ahead at most
# `with_retries`: tries of a call (when this is None, $COLORCORE_STORAGE_ATTEMPTS, else 7),
# and the back-off between them (doubling from the first, at most the last, each times
# 0.5-1.5 at random): at 7, 15.75 s of back-off in all on average, for a store that
# throttles or drops connections for a while.
RETRY_ATTEMPTS: int | None = None
RETRY_DELAY_S = (0.25, 8.0)
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
              NotADirectoryError, ValueError, TypeError)  # fmt: skip
# A local request refused as it is (the same call fails again).
_PERMANENT_ERRNOS = frozenset({errno.EINVAL, errno.EMSGSIZE, errno.ENAMETOOLONG, errno.EPERM,
                               errno.EACCES, errno.EROFS})  # fmt: skip
# S3's replies that may pass if the request is made again: a transfer damaged on its way,
# a store busy or failing. Other 4xx replies refuse the request as it is (an InvalidRange,
# a wrong region, a redirect, a conditional write the store does not implement), whatever
# exception s3fs makes of them (often OSError(EINVAL)).
S3_TRANSIENT_REPLIES = frozenset({
    "IncompleteBody", "BadDigest", "XAmzContentSHA256Mismatch",  # damaged on the way
    "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "InternalError",
    "ServiceUnavailable", "OperationAborted", "ConditionalRequestConflict",
    # botocore's throttling codes
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "RequestLimitExceeded", "TooManyRequestsException",
    "BandwidthLimitExceeded", "ProvisionedThroughputExceededException",
    "EC2ThrottledException",
})  # fmt: skip
S3_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})  # not 501, Not Implemented
# pyarrow's S3 filesystem (the manifest's Parquet, Ray's reads) raises a plain OSError
# whose text names the AWS SDK's error type, or its number and the HTTP status; of the
# types, these may pass if the request is made again.
_ARROW_S3_ERROR = re.compile(r"AWS Error (\[code \d+\]|[A-Z_]+)(?: \(HTTP status (\d+)\))? during")
ARROW_S3_TRANSIENT = frozenset({"INTERNAL_FAILURE", "NETWORK_CONNECTION", "SERVICE_UNAVAILABLE",
                                "THROTTLING", "SLOW_DOWN", "REQUEST_TIMEOUT"})  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class S3Options:
    """How to reach S3-compatible storage (credentials come from the environment, never here)."""

    endpoint_url: str | None = None
    """S3-compatible endpoint, e.g. http://127.0.0.1:9000 (default: $AWS_ENDPOINT_URL_S3,
    then $AWS_ENDPOINT_URL, else AWS itself)."""
    region: str | None = None
    """Bucket region (default: $AWS_REGION / $AWS_DEFAULT_REGION, else us-east-1)."""

    def __post_init__(self) -> None:
        if self.endpoint_url is not None:
            _check_endpoint(self.endpoint_url, "endpoint_url")

    def resolved_endpoint(self) -> str | None:
        if self.endpoint_url:
            return self.endpoint_url
        for variable in _ENDPOINT_ENV:
            if endpoint := os.environ.get(variable):
                return _check_endpoint(endpoint, f"${variable}")
        return None

    def resolved_region(self) -> str:
        env = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return self.region or env or "us-east-1"


def _check_endpoint(endpoint: str, where: str) -> str:
    """`endpoint` if it is http(s)://host[:port] without credentials (never echoed if not)."""
    parsed = urlparse(endpoint)
    if parsed.username or parsed.password or "@" in endpoint:
        raise ValueError(f"{where} must not carry credentials: give them in the environment")
    # a path, query or fragment would reach s3fs but not pyarrow (Ray's uploads), which
    # takes the host and port only
    rest = parsed.path.strip("/") or parsed.params or parsed.query or parsed.fragment
    try:
        parsed.port  # noqa: B018 (a port not a number, or out of range, raises)
    except ValueError:
        rest = "a bad port"
    if parsed.scheme not in ("http", "https") or not parsed.netloc or rest:
        shown = endpoint.partition("?")[0].partition("#")[0]  # a query may hold a token
        more = " and more after it" if shown != endpoint else ""
        raise ValueError(f"{where} must be http(s)://host[:port], got {shown!r}{more}")
    return endpoint


def _redacted(url: str) -> str:
    """`url` for a message: everything before the last ``@`` after its scheme, or without
    one (``user:secret@host/...``) before it (a user and a password, which may itself hold
    ``/`` or ``@``), and a query (a presigned URL's signature), replaced by ``***``."""
    if "?" in url:
        url = url.partition("?")[0] + "?***"
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    if "@" in url:
        return f"***@{url.rpartition('@')[2]}"
    return url


def split_url(url: str) -> tuple[str, str]:
    """``s3://b/k`` -> ("s3", "b/k"); a local path -> ("file", absolute path). Keys are
    taken whole: ``#`` and ``?`` are characters of a key, not a fragment or query."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if sep and scheme == "file":
        if rest.startswith("localhost/"):  # file://localhost/data is /data
            rest = rest[len("localhost") :]
        if not rest.startswith("/"):  # file://data/x: a host, not a folder here
            raise ValueError(
                f"{_redacted(url)!r} names a host: a local file URL is file:///absolute/path"
            )
        return "file", os.path.abspath(os.path.expanduser(rest))
    if sep and scheme in ("s3", "s3a", "gs", "gcs"):
        protocol = "s3" if scheme.startswith("s3") else "gs"
        bucket, _, key = rest.partition("/")
        # user:secret@bucket, refused without echoing it; a secret may hold "/", which
        # leaves "user:part" as the bucket: a bucket's name never holds ":" or "@"
        if "@" in bucket or ":" in bucket:
            raise ValueError(
                f"a {scheme}:// URL must not carry credentials: give them in the environment"
            )
        if not bucket:
            raise ValueError(f"{_redacted(url)!r}: no bucket")
        return protocol, f"{bucket}/{key.lstrip('/')}".rstrip("/")
    parsed = urlparse(url)
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # len 1: a Windows drive
        # file:/x: the rest whole, as above (urlparse would take #... and ?... off it)
        path = url[len("file:") :] if parsed.scheme == "file" else url
        return "file", os.path.abspath(os.path.expanduser(path))
    raise ValueError(
        f"unsupported storage URL {_redacted(url)!r}: use a local path, s3:// or gs://"
    )


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def absolute(url: str) -> str:
    """Local paths made absolute (workers run in other directories); other URLs unchanged."""
    protocol, path = split_url(url)
    return path if protocol == "file" else url


def with_absolute_paths(cfg: C, *fields: str) -> C:
    """The config with the local paths in `fields` made absolute (Ray workers run in other
    directories); empty fields and other URLs unchanged."""
    return dataclasses.replace(cfg, **{k: absolute(v) for k in fields if (v := getattr(cfg, k))})


def is_local(url: str) -> bool:
    return split_url(url)[0] == "file"


def filesystem(
    url: str, s3: S3Options | None = None, *, streamed: bool = False
) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem for `url` and the path within it. On S3 its calls are tried once
    (s3fs's and botocore's retries off), for `with_retries` to retry; `streamed`: for a file
    read in many requests through ``fs.open`` (a tar read as a stream), where no call of
    ours is around each request, s3fs and botocore retry each one themselves."""
    import fsspec

    protocol, path = split_url(url)
    if protocol == "s3":
        s3 = s3 or S3Options()
        kwargs = {"endpoint_url": s3.resolved_endpoint(),
                  "client_kwargs": {"region_name": s3.resolved_region()}}  # fmt: skip
        if streamed:
            return fsspec.filesystem("s3", **kwargs), path
        fs = fsspec.filesystem("s3", **kwargs, config_kwargs={"retries": {"total_max_attempts": 1}})
        fs.retries = 1  # s3fs's own (a class default), on this instance of fsspec's cache
        return fs, path
    if protocol == "gs":
        return fsspec.filesystem("gcs"), path
    return fsspec.filesystem("file", auto_mkdir=True), path


def arrow_filesystem(url: str, s3: S3Options | None = None) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem for `url` and the path in it (as Ray Data and Ray Train take them)."""
    import pyarrow.fs

    protocol, path = split_url(url)
    if protocol == "s3":
        s3 = s3 or S3Options()
        endpoint = s3.resolved_endpoint()
        kwargs: dict = {"region": s3.resolved_region()}
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
        return pyarrow.fs.S3FileSystem(**kwargs), path
    if protocol == "gs":
        return pyarrow.fs.GcsFileSystem(), path
    return pyarrow.fs.LocalFileSystem(), path


def is_transient(error: BaseException) -> bool:
    """Whether an I/O error may pass if the call is made again (not a missing file, nor a
    refusal)."""
    kinds = (OSError, ConnectionError, TimeoutError, *_failures_without_reply())
    if not isinstance(error, kinds) or isinstance(error, _PERMANENT):
        return False
    if _certificate_refused(error):
        return False
    code, status = _s3_reply(error)
    if code is not None or status is not None:  # S3's answer
        return code in S3_TRANSIENT_REPLIES or status in S3_TRANSIENT_STATUS
    if type(error) is OSError and (arrow := _ARROW_S3_ERROR.search(str(error))):
        kind, status = arrow[1], arrow[2] and int(arrow[2])
        if not kind.startswith("["):
            return kind in ARROW_S3_TRANSIENT or status in S3_TRANSIENT_STATUS
        return not status or status in S3_TRANSIENT_STATUS  # a type pyarrow does not name
    return not (isinstance(error, OSError) and error.errno in _PERMANENT_ERRNOS)


def _certificate_refused(error: BaseException) -> bool:
    """Whether a TLS handshake failed on the endpoint's certificate, the same on every
    attempt (not a handshake cut short, which may pass): the error or one it was raised
    from, or the one botocore wraps (aiohttp's certificate error is the ssl module's)."""
    import ssl

    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError):
            return True
        wrapped = getattr(cause, "kwargs", {}).get("error")  # botocore's SSLError(error=...)
        cause = cause.__cause__ or (wrapped if isinstance(wrapped, BaseException) else None)
    return False


def from_storage(error: BaseException) -> bool:
    """Whether an error is the storage's or the network's, not the data's: one that may
    pass (`is_transient`), or any S3 reply, or a failed connection."""
    kinds = (ConnectionError, TimeoutError, *_failures_without_reply())
    return is_transient(error) or _s3_reply(error) != (None, None) or isinstance(error, kinds)


@functools.cache
def _failures_without_reply() -> tuple[type[BaseException], ...]:
    """Failures without a whole HTTP response, which s3fs passes on as they are, not as
    OSError: botocore's (endpoint unreachable, connection closed, read time-out), a body cut
    short (http.client's and aiohttp's), and a reply botocore could not parse (a throttled
    store's may be half-written XML)."""
    from http.client import IncompleteRead  # urllib3's too

    kinds: tuple[type[BaseException], ...] = (IncompleteRead,)
    with contextlib.suppress(ImportError):
        from botocore.exceptions import ConnectionError, HTTPClientError
        from botocore.parsers import ResponseParserError

        kinds += (ConnectionError, HTTPClientError, ResponseParserError)
    with contextlib.suppress(ImportError):
        from aiohttp import ClientPayloadError

        kinds += (ClientPayloadError,)
    return kinds


def with_retries(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int | None = None,
    base_delay_s: float | None = None,
    max_delay_s: float | None = None,
) -> T:
    """Call `fn`, retrying transient I/O errors with exponential backoff and jitter
    (`RETRY_ATTEMPTS` tries and `RETRY_DELAY_S` unless given)."""
    if attempts is None:
        attempts = RETRY_ATTEMPTS or _attempts_from_environment()
    base_delay_s = RETRY_DELAY_S[0] if base_delay_s is None else base_delay_s
    max_delay_s = RETRY_DELAY_S[1] if max_delay_s is None else max_delay_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:
            if attempt == attempts or not is_transient(e):
                raise
            delay = min(max_delay_s, base_delay_s * 2 ** (attempt - 1)) * (0.5 + random.random())
            log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(e).__name__, e,
                        attempt, attempts - 1, delay)  # fmt: skip
            time.sleep(delay)
    raise AssertionError("unreachable")


def _attempts_from_environment() -> int:
    """`COLORCORE_STORAGE_ATTEMPTS`, tries of a storage call (default 7)."""
    text = os.environ.get("COLORCORE_STORAGE_ATTEMPTS", "7")
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"COLORCORE_STORAGE_ATTEMPTS must be a whole number >= 1, got {text!r}")
    return int(text)


def read_bytes(url: str, s3: S3Options | None = None) -> bytes:
    fs, path = filesystem(url, s3)
    return with_retries(lambda: fs.cat_file(path), what=f"read {url}")


def read_each(
    urls: Iterable[str | None],
    s3: S3Options | None = None,
    *,
    sizes: Iterable[int] | None = None,
    ahead: int = 8,
    max_bytes: int = READ_EACH_MAX_BYTES,
) -> Iterator[bytes | Exception | None]:
    """`read_bytes` of each URL, in order, up to `ahead` reads at once and, where `sizes`
    (from a listing) are given, up to `max_bytes` of files at once (one read at a time
    leaves a task waiting on the network for most of its time with small files on object
    storage); a read that failed gives its exception, a None URL gives None.

    Left before its end (its consumer failed), the generator waits for no read: it may be
    closed by the garbage collector, in whatever thread it runs, even one starting up, where
    joining the pool's threads would wait for ever on the lock that thread holds."""
    pending: collections.deque[tuple[Future | None, int]] = collections.deque()
    held, finished = 0, False
    pool = ThreadPoolExecutor(ahead, thread_name_prefix="read-each")
    try:
        known = sizes if sizes is not None else itertools.repeat(0)
        for url, size in zip(urls, known, strict=sizes is not None):
            while pending and (len(pending) >= ahead or held + size > max_bytes):
                future, done_size = pending.popleft()
                held -= done_size
                yield _outcome(future)
            future = None if url is None else pool.submit(read_bytes, url, s3)
            pending.append((future, 0 if url is None else size))
            held += pending[-1][1]
        while pending:
            yield _outcome(pending.popleft()[0])
        finished = True
    finally:  # reads under way when left go on in their threads, which then end
        pool.shutdown(wait=finished, cancel_futures=True)


def _outcome(future: Future | None) -> bytes | Exception | None:
    if future is None:
        return None
    error = future.exception()
    return error if isinstance(error, Exception) else future.result()


def read_range(url: str, start: int, size: int, s3: S3Options | None = None) -> bytes:
    """`size` bytes of a file from byte `start` (fewer where the file ends first), in one
    ranged read through no read-ahead cache (which on S3 would fetch a block more)."""
    if size <= 0:  # an empty range would read as no range: the whole file
        return b""
    fs, path = filesystem(url, s3)
    return with_retries(
        lambda: fs.cat_file(path, start=start, end=start + size), what=f"read {url}"
    )


def write_bytes(url: str, data: bytes, s3: S3Options | None = None) -> None:
    """Write a whole object; readers see the old or the new content, never a partial file,
    and a local file is on disk when this returns (`_write_synced`)."""
    fs, path = filesystem(url, s3)
    if is_local(url):
        tmp = temporary_beside(path)
        try:
            _write_synced(tmp, data)
            os.replace(tmp, path)
            _sync_folder(path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
    else:  # an object store's PUT is atomic
        with_retries(lambda: fs.pipe_file(path, data), what=f"write {url}")


def _write_synced(path: str, data: bytes) -> None:
    """Writes a new local file (its folders made as needed) and has its content on disk, so
    that a rename or link that then publishes it survives a crash of the machine: without
    this a file system may commit the rename first, and leave an empty file under the final
    name (ext4 does for a new file), though the job went on as if it were written. A file
    system that cannot sync (some FUSE mounts) is written as before, unsynced."""
    _make_folders(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        _sync(f.fileno())


def _make_folders(folder: str) -> None:
    """`os.makedirs(folder, exist_ok=True)`, each folder it makes synced into its parent's
    entries: a file synced into a folder that a crash then loses is lost with it."""
    missing = []
    while folder and not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for made in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another writer's, made meanwhile
            os.mkdir(made)
        _sync_folder(made)


_CANNOT_SYNC = (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)


def _sync(fd: int) -> None:
    """fsync, where the file system has it (a real error, EIO among them, is raised)."""
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in _CANNOT_SYNC:
            raise


def _sync_folder(path: str) -> None:
    """Has the entry a rename or link made for `path` on disk, where the file system syncs
    folders (some network file systems do not: the rename is then theirs to keep)."""
    with contextlib.suppress(OSError):
        folder = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


NAME_MAX = 255  # bytes of a file's name on the usual local file systems


def temporary_beside(path: str) -> str:
    """A local file's temporary name while it is written (`STALE_TEMPORARY`): its writer's
    machine (`MACHINE`) and process id in it, after as much of the file's name as leaves
    the whole within `NAME_MAX` bytes (a name the file system takes has a temporary it takes)."""
    folder, name = os.path.split(path)
    suffix = f".tmp-{MACHINE}-{os.getpid()}-{random.randrange(1 << 30):x}"
    kept = os.fsencode(name)[: NAME_MAX - len(suffix)]
    return os.path.join(folder, os.fsdecode(kept) + suffix)


def _machine() -> str:
    """8 hex digits naming the space this process's id is unique in: the host's name and
    its pid namespace (containers on one host may share a name, as Ray's on the host's
    network do, and number their processes apart)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}\0{namespace}".encode()).hexdigest()[:8]


MACHINE = _machine()
OTHER_MACHINES_WRITE_S = 86_400  # another machine's temporary file is left behind after
# temporary_beside's names: group 1 the machine (none in names written before it was
# there, taken for this machine's), group 2 the process id
STALE_TEMPORARY = re.compile(r"\.tmp-(?:([0-9a-f]{8})-)?(\d+)-[0-9a-f]{1,8}$")


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this machine is running (or, another user's, exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def list_files_swept(url: str, s3: S3Options | None = None) -> list[str]:
    """`list_files` of `url`, less temporary files of local writes, of which those a
    process that has ended left behind are removed (a job's re-run calls this before it
    writes: they would be its own otherwise, and fill the disk run after run). A live
    process's are left to it: another job may be writing beside this one. On a folder
    other machines share, another machine's are left too, whether its writer lives cannot
    be told from here, until a day old (`OTHER_MACHINES_WRITE_S`: machines that are not
    coming back, as a restarted pod's, leave them too)."""
    found = list_files(url, s3)
    if not is_local(url):
        return found  # an object store's write is one request: nothing half-written stays
    temporary = {u for u in found if STALE_TEMPORARY.search(u)}
    for u in temporary:
        remove_if_left_behind(split_url(u)[1])
    return [u for u in found if u not in temporary]


def remove_if_left_behind(path: str) -> None:
    """Deletes the local file `path` if it is a write's temporary file (`temporary_beside`)
    whose writer, a process of this machine, has ended, or another machine's, untouched for
    longer than any write takes (`OTHER_MACHINES_WRITE_S`)."""
    match = STALE_TEMPORARY.search(path)
    if not match:
        return
    with contextlib.suppress(FileNotFoundError):
        if match[1] in (None, MACHINE):
            left = not process_alive(int(match[2]))
        else:
            left = time.time() - os.stat(path).st_mtime > OTHER_MACHINES_WRITE_S
        if left:
            os.remove(path)


def create_bytes(url: str, data: bytes, s3: S3Options | None = None) -> bool:
    """Write a whole object unless the URL holds one already: whether this call created it.
    Of callers racing to create one URL, one wins and the others find its content, where the
    store can tell: S3 writes with If-None-Match, which AWS honours (a store that ignores it
    overwrites); a local file is hard-linked into place, whole. Where the file system has no
    hard links it is created exclusively and then written, which a reader may catch half
    written."""
    fs, path = filesystem(url, s3)
    if is_local(url):
        return _create_local(path, data)

    def put() -> None:
        try:
            fs.pipe_file(path, data, mode="create")
        except OSError as error:  # a 412 whose reply names no condition: not FileExistsError
            if _precondition_failed(error):
                raise FileExistsError(url) from error
            raise

    try:  # a retry after a lost reply finds this call's own object: then its content decides
        with_retries(put, what=f"create {url}")
        return True
    except FileExistsError:
        return False


def _create_local(path: str, data: bytes) -> bool:
    tmp = temporary_beside(path)
    try:
        _write_synced(tmp, data)
        os.link(tmp, path)
        _sync_folder(path)
        return True
    except FileExistsError:
        return False
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV):
            raise
        try:  # no hard links here: created exclusively, written in place
            f = open(path, "xb")  # noqa: SIM115 (removed below where its writing fails)
        except FileExistsError:
            return False
        try:
            with f:
                f.write(data)
                f.flush()
                _sync(f.fileno())
        except BaseException:  # what was written would read as the file, another's create
            with contextlib.suppress(OSError):
                os.remove(path)
            raise
        return True
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def _precondition_failed(error: BaseException) -> bool:
    """Whether an S3 error is a 412 Precondition Failed (s3fs passes it on as
    FileExistsError only when the reply names the If-None-Match condition)."""
    code, status = _s3_reply(error)
    return code == "PreconditionFailed" or status == 412


def not_implemented(error: BaseException) -> bool:
    """Whether an S3 error is a 501 Not Implemented: a request (a conditional write, say)
    this store does not take."""
    return _s3_reply(error)[1] == 501


def _s3_reply(error: BaseException) -> tuple[str | None, int | None]:
    """(error code, HTTP status) of the S3 reply behind an error s3fs raised (its cause),
    or Nones for any other error."""
    response = getattr(getattr(error, "__cause__", None), "response", None) or {}
    return response.get("Error", {}).get("Code"), response.get("ResponseMetadata", {}).get(
        "HTTPStatusCode"
    )


# S3 refusals of one object that a re-run meets again: no permission on it, or archived.
# s3fs raises PermissionError for the credentials' failures too (an expired token, a wrong
# key, a skewed clock), which a re-run with good ones gets past.
OBJECT_REFUSALS = frozenset({"AccessDenied", "InvalidObjectState"})


def refused_for_good(error: BaseException) -> bool:
    """Whether a read's `error` says the file will not read on a re-run either: missing, a
    folder, or refused itself (local permissions; on S3 `OBJECT_REFUSALS`), rather than a
    failure of the storage or of the credentials."""
    if isinstance(error, (FileNotFoundError, IsADirectoryError)):
        return True
    if not isinstance(error, PermissionError):
        return False
    if error.__cause__ is None:  # the local filesystem's
        return True
    return _s3_reply(error)[0] in OBJECT_REFUSALS


def remove(urls: Sequence[str], s3: S3Options | None = None) -> None:
    """Delete files of one filesystem; those already gone are not an error. Names are taken
    as they are, never as glob patterns (``[``, ``*`` and ``?`` are valid in keys)."""
    if not urls:
        return
    fs, _ = filesystem(urls[0], s3)
    protocol, paths = split_url(urls[0])[0], [split_url(u)[1] for u in urls]
    if protocol == "file":
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    elif protocol == "s3":
        _delete_s3_objects(fs, paths)
    else:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                with_retries(lambda path=path: fs.rm_file(path), what=f"remove {path}")


DELETE_OBJECTS_MAX_KEYS = 1000  # S3's limit on the keys of one DeleteObjects request


def _delete_s3_objects(fs: fsspec.AbstractFileSystem, paths: Sequence[str]) -> None:
    """S3 DeleteObjects in requests of up to DELETE_OBJECTS_MAX_KEYS keys, failing on any
    key it could not delete (s3fs's own bulk delete drops those errors)."""
    by_bucket: dict[str, list[str]] = {}
    for path in paths:
        bucket, key = path.split("/", 1)
        by_bucket.setdefault(bucket, []).append(key)
    for bucket, keys in by_bucket.items():
        step = DELETE_OBJECTS_MAX_KEYS
        for start in range(0, len(keys), step):
            objects = [{"Key": k} for k in keys[start : start + step]]
            with_retries(
                functools.partial(_delete_s3_batch, fs, bucket, objects),
                what=f"delete {len(objects)} objects in s3://{bucket}",
            )
    fs.invalidate_cache()  # listings s3fs keeps would still show the keys


RETRYABLE_S3_CODES = frozenset(
    {"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout"}
)  # a DeleteObjects key's error that S3 asks to send again


def _delete_s3_batch(fs: fsspec.AbstractFileSystem, bucket: str, objects: list[dict]) -> None:
    """One DeleteObjects request; keys S3 could not delete fail it: for good (PermissionError)
    unless S3 says to try again (an OSError, which `with_retries` retries). A key already
    gone is no failure."""
    request = {"Bucket": bucket, "Delete": {"Objects": objects, "Quiet": True}}
    response = fs.call_s3("delete_objects", **request)
    failed = [e for e in response.get("Errors", []) if e.get("Code") != "NoSuchKey"]
    if not failed:
        return
    first = failed[0]
    message = (
        f"{len(failed)} of {len(objects)} objects in s3://{bucket} not deleted, "
        f"e.g. {first.get('Key')}: {first.get('Code')} {first.get('Message', '')}"
    )
    if all(e.get("Code") in RETRYABLE_S3_CODES for e in failed):
        raise OSError(errno.EAGAIN, message)
    raise PermissionError(message)


def check_reachable(url: str, s3: S3Options | None = None) -> None:
    """A ValueError where the bucket of an object-store `url` does not exist. S3 is asked for
    one key of the URL's own prefix, a listing a role allowed only that prefix may make
    (s3fs's `exists` of the bucket asks for the bucket, and reads any error as "no"), with
    transient errors retried; other stores are asked whether the bucket exists."""
    if is_local(url):
        return
    fs, path = filesystem(url, s3)
    bucket, _, prefix = path.partition("/")

    def found() -> bool:
        try:
            fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
        except FileNotFoundError:  # s3fs's NoSuchBucket
            return False
        return True

    ask = found if hasattr(fs, "call_s3") else lambda: fs.exists(bucket)
    if not with_retries(ask, what=f"reach {url}"):
        raise ValueError(f"storage {url} is not reachable (no bucket {bucket!r})")


def exists(url: str, s3: S3Options | None = None) -> bool:
    fs, path = filesystem(url, s3)
    return with_retries(lambda: fs.exists(path), what=f"stat {url}")


def list_files(url: str, s3: S3Options | None = None, *, suffix: str = "") -> list[str]:
    """Every file below `url` (recursive), sorted, as URLs spelled as `url` is (``s3a://``
    stays ``s3a://``, so that they equal `join` of it). Listed anew, and not kept: s3fs would
    answer later listings, and reads of files other processes wrote since, from the listings
    it keeps (a file missing from one reads as missing)."""
    return sorted(u for u in sized_files(url, s3) if u.endswith(suffix))


def sized_files(url: str, s3: S3Options | None = None) -> dict[str, int]:
    """`list_files` of `url` (URLs spelled as `url` is, a key's ``//`` kept), each with its
    size in bytes."""
    fs, path = filesystem(url, s3)
    found = _find(fs, path, url)
    prefix, path = url.rstrip("/"), path.rstrip("/")  # a local path: absolute, `url` may not be
    return {
        prefix + p[len(path) :]: info.get("size") or 0
        for p, info in found.items()
        if p == path or p.startswith(path + "/")
    }


def file_sizes(url: str, s3: S3Options | None = None) -> dict[str, int]:
    """Every file below `url` (recursive): its path relative to `url` -> its size in bytes.
    Listed anew and not kept, as by `list_files` (the listings s3fs keeps would hold a
    folder of a million files in memory for as long as the process lives)."""
    fs, path = filesystem(url, s3)
    root = path.rstrip("/")
    found = _find(fs, path, url)
    return {p[len(root) :].lstrip("/"): info.get("size") or 0 for p, info in found.items()}


def _files(found: dict[str, dict]) -> dict[str, dict]:
    """`fs.find`'s result less S3's folder placeholders (the empty objects named ``a/``
    that consoles and sync tools make for folders, which s3fs lists as files) and less a
    local folder's special files (a named pipe, a socket, a device), whose reading would
    wait for ever or never end: left out with a warning."""
    special = sorted(p for p, info in found.items() if info.get("type") == "other" and _special(p))
    if special:
        named = ", ".join(special[:5]) + (", ..." if len(special) > 5 else "")
        log.warning("left out %d special files (a pipe, a socket, a device): %s",
                    len(special), named)  # fmt: skip
    left_out = set(special)
    return {p: info for p, info in found.items() if not p.endswith("/") and p not in left_out}


def _special(path: str) -> bool:
    """Whether a local file that fsspec lists as neither file nor folder is a special file,
    or a link to one; a link that does not resolve (or loops) is not: it is read, and fails,
    as a file."""
    import stat

    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _find(fs: fsspec.AbstractFileSystem, path: str, url: str) -> dict[str, dict]:
    _forget_listings(fs, path)
    try:
        return _files(with_retries(lambda: fs.find(path, detail=True), what=f"list {url}"))
    finally:
        _forget_listings(fs, path)


def _forget_listings(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Drops the listings s3fs keeps of `path`, its parents and every folder below it
    (`invalidate_cache` drops the first two only)."""
    fs.invalidate_cache(path)
    cache = getattr(fs, "dircache", None)
    below = path.rstrip("/") + "/"
    for key in [k for k in cache or () if k.startswith(below)]:
        cache.pop(key, None)
