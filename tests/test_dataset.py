"""The prepared-dataset layout: shard schema and manifest.json."""

from __future__ import annotations

import pyarrow as pa
import pytest

from jobs.dataset import SHARD_SCHEMA, Manifest, ShardInfo, validate_shard_table


def shard_table(keys: list[str]) -> pa.Table:
    n = len(keys)
    return pa.Table.from_pydict(
        {
            "key": keys,
            "label": [0] * n,
            "jpeg": [b"\xff\xd8"] * n,
            "height_px": [256] * n,
            "width_px": [341] * n,
            "src_sha256": ["0" * 64] * n,
            "grayscale": [False] * n,
        },
        schema=SHARD_SCHEMA,
    )


def test_shard_schema_accepts_its_own_tables_and_rejects_others() -> None:
    validate_shard_table(shard_table(["a/1", "a/2"]))
    with pytest.raises(ValueError, match="duplicate keys"):
        validate_shard_table(shard_table(["a/1", "a/1"]))
    wrong = shard_table(["a/1"]).drop_columns(["grayscale"])
    with pytest.raises(ValueError, match="schema mismatch"):
        validate_shard_table(wrong)
    retyped = shard_table(["a/1"]).set_column(1, "label", pa.array([0], pa.int64()))
    with pytest.raises(ValueError, match="schema mismatch"):
        validate_shard_table(retyped)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_manifest_round_trip_and_reconciliation(where, tmp_path, request) -> None:
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_server").url("ds")
    manifest = Manifest(
        classes=("cat", "dog"),
        shards=(ShardInfo(name="shards/train-00000.parquet", num_rows=3, sha256="ab" * 32),),
        num_inputs=5,
        num_errors=2,
        num_grayscale=1,
        config={"short_side_px": 256},
    )
    manifest.save(root)
    assert Manifest.load(root) == manifest
    assert Manifest.load(root).shards_sha256 == manifest.shards_sha256
    assert manifest.num_rows == 3
    with pytest.raises(ValueError, match="does not reconcile"):
        Manifest(classes=(), shards=manifest.shards, num_inputs=4, num_errors=2)
    with pytest.raises(ValueError, match="not a prepared dataset"):
        Manifest.load(str(tmp_path / "elsewhere"))
