"""The on-storage layout of a prepared dataset, shared by every job that reads or writes one.

A dataset is a folder (local or on object storage)::

    <dataset>/manifest.json            what is there: classes, shards, counts, errors, config
    <dataset>/shards/part-GGGGG-PPP.parquet  shards (schema below): part PPP of group GGGGG
    <dataset>/prior.npz                the ab prior over the dataset (written by jobs.prior)

Shard rows (Parquet, `SHARD_SCHEMA`):

    key         string   unique, stable id of the source image: "<class>/<path>", its path
                         below the class folder (below SRC with a labels file; its file
                         name within an ILSVRC class tar) less the file's extension
    label       int32    index into manifest["classes"]
    jpeg        binary   the image as JPEG (4:4:4 chroma, quality 95) or its original bytes
    height_px   int32    height of the stored image
    width_px    int32    width of the stored image
    src_sha256  string   hex SHA-256 of the source file's bytes (provenance, de-duplication)
    grayscale   bool     the source has no colour (training skips these, as the released code did)

`prior.npz` (numpy, no pickles): ``counts_Q`` int64 (313,) pixel counts per ab bin,
``bins`` float32 (313, 2) bin centres, ``smoothing_sigma`` float64 scalar, the Gaussian sigma
the consumers smooth with; see `colorcore.prior.AbHistogram`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from jobs import storage

MANIFEST_FILE = "manifest.json"
PRIOR_FILE = "prior.npz"
SHARDS_DIR = "shards"
MANIFEST_FORMAT = "colorcore-dataset-v1"

SHARD_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("jpeg", pa.binary(), nullable=False),
        pa.field("height_px", pa.int32(), nullable=False),
        pa.field("width_px", pa.int32(), nullable=False),
        pa.field("src_sha256", pa.string(), nullable=False),
        pa.field("grayscale", pa.bool_(), nullable=False),
    ]
)


SHARD_ROW_GROUP_ROWS = 64
"""Rows per Parquet row group of a shard: the unit the training loader reads, so that a
window of its shuffle mixes the images of many shards (an ImageNet shard holds one class)."""


def shard_parquet(table: pa.Table, row_group_rows: int = SHARD_ROW_GROUP_ROWS) -> bytes:
    """A shard table as a Parquet file: the JPEG bytes stored as they are (neither compressed
    nor dictionary-encoded, no statistics), the small columns compressed with zstd."""
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    small = [name for name in table.column_names if name != "jpeg"]
    pq.write_table(
        table,
        buffer,
        row_group_size=row_group_rows,
        use_dictionary=small,
        write_statistics=small,  # a JPEG column's min and max would be two whole files a page
        compression={name: "zstd" for name in small} | {"jpeg": "none"},
    )
    return buffer.getvalue()


def validate_shard_table(table: pa.Table) -> None:
    """Raise ValueError unless `table` has exactly the shard schema and unique keys."""
    if not table.schema.equals(SHARD_SCHEMA):
        raise ValueError(f"shard schema mismatch:\n{table.schema}\nexpected:\n{SHARD_SCHEMA}")
    keys = table.column("key")
    if len(keys.unique()) != len(keys):
        raise ValueError("shard has duplicate keys")


@dataclass(frozen=True, kw_only=True)
class ShardInfo:
    name: str
    """Path of the shard relative to the dataset folder."""
    num_rows: int
    sha256: str
    """Hex SHA-256 of the shard file."""


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """``manifest.json``: the index of a prepared dataset."""

    classes: tuple[str, ...]
    shards: tuple[ShardInfo, ...]
    num_inputs: int
    """Source files seen; num_inputs == num_rows + num_errors."""
    num_errors: int
    num_grayscale: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    """The resolved config of the job that wrote the dataset."""
    format: str = MANIFEST_FORMAT

    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.shards)

    def __post_init__(self) -> None:
        if self.format != MANIFEST_FORMAT:
            raise ValueError(f"unknown manifest format {self.format!r}")
        if self.num_inputs != self.num_rows + self.num_errors:
            raise ValueError(
                f"manifest does not reconcile: {self.num_inputs} inputs != "
                f"{self.num_rows} rows + {self.num_errors} errors"
            )

    def require_images(self, url: str) -> None:
        """Raises ValueError where the dataset (at `url`) holds no image: every input failed
        to prepare, or there was none."""
        if not self.num_rows:
            raise ValueError(
                f"{url}: the prepared dataset holds no images ({self.num_errors} of its "
                f"{self.num_inputs} inputs failed to prepare; errors.json beside its manifest "
                "says why)"
            )

    @property
    def shards_sha256(self) -> str:
        """SHA-256 of the shards by name, size and checksum: the same wherever the dataset
        has moved, another once any shard changed."""
        listed = [[s.name, s.num_rows, s.sha256] for s in self.shards]
        return hashlib.sha256(json.dumps(listed).encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        data["classes"] = tuple(data["classes"])
        data["shards"] = tuple(ShardInfo(**s) for s in data["shards"])
        return cls(**data)

    def save(self, dataset_url: str, s3: storage.S3Options | None = None) -> None:
        storage.write_bytes(storage.join(dataset_url, MANIFEST_FILE), self.to_json().encode(), s3)

    @classmethod
    def load(cls, dataset_url: str, s3: storage.S3Options | None = None) -> Manifest:
        url = storage.join(dataset_url, MANIFEST_FILE)
        if not storage.exists(url, s3):
            raise ValueError(f"{dataset_url} is not a prepared dataset: no {MANIFEST_FILE}")
        return cls.from_json(storage.read_bytes(url, s3).decode())
