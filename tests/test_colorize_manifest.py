"""The colorize manifest's parts: latest row per source, compaction while the job runs and at
its end, on a local folder and on the moto S3 endpoint."""

from __future__ import annotations

import pyarrow as pa
import pytest

from jobs import colorize_manifest as manifest


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("s3_server").url(f"manifest-{request.node.originalname}")


def row(source: str, time: str, status: str = "ok") -> dict:
    return {
        "source": source,
        "output": source if status == "ok" else "",
        "status": status,
        "reason": "" if status == "ok" else "broken",
        "time": f"2026-11-29T10:00:{time}+00:00",
        "pages": 1,
        "width_px": 4,
        "height_px": 3,
        "model_sha256": "f" * 64,
        "temperature": 0.38,
        "seconds": 0.5,
    }


def test_latest_keeps_each_sources_latest_row_sorted_by_source() -> None:
    rows = [row("b", "02.000"), row("a", "05.000", "error"), row("b", "01.000", "error"),
            row("a", "03.000"), row("c", "01.000"), row("c", "01.000", "error")]  # fmt: skip
    table = manifest.latest(pa.Table.from_pylist(rows, schema=manifest.SCHEMA))
    assert table.column("source").to_pylist() == ["a", "b", "c"]
    # a: the later time wins over the row order; c: equal times, the later row.
    assert table.column("status").to_pylist() == ["error", "ok", "error"]
    assert manifest.latest(manifest.SCHEMA.empty_table()).num_rows == 0


def test_compactor_folds_parts_it_has_seen_whole(output) -> None:
    """Parts are removed once all their rows are folded into a compacted part, never before;
    this run's compacted parts are merged as a binary counter carries (after n equal folds,
    as many parts as n has ones in binary); `read` sees every row at every moment; the end of
    the job leaves one file."""
    rows = [row(f"img{i:03d}", f"{i // 10:02d}.{i % 10:03d}") for i in range(60)]
    parts = [manifest.write_part(rows[i : i + 4], output, None) for i in range(0, 60, 4)]
    compactor = manifest.Compactor(output, None, every_rows=10, every_s=1e9)
    # The driver may receive a part's rows in pieces, and parts in any order.
    pieces = []
    for table, url in parts:
        columns = manifest.with_part(table, url)
        pieces += [{k: v[:2] for k, v in columns.items()}, {k: v[2:] for k, v in columns.items()}]
    all_parts, whole, folds = {u for _, u in parts}, set(), 0
    for i, piece in enumerate(pieces):
        compactor.add(piece)
        if i % 2:
            whole.add(piece["part"][0])
        names = [u.rsplit("/", 1)[1] for u in manifest.list_parts(output, None)]
        compacted = [n for n in names if n.startswith("compacted-")]
        folds += not compactor.pending
        assert len(compacted) == bin(folds).count("1"), (folds, compacted)
        assert manifest.read(output, None).num_rows == 60
        left = all_parts & set(manifest.list_parts(output, None))
        assert left >= all_parts - whole  # a part is never removed before its last row
        if not compactor.pending:  # just folded: every part seen whole is gone
            assert left == all_parts - whole
    compactor.fold()
    assert not all_parts & set(manifest.list_parts(output, None))
    assert manifest.read(output, None).to_pylist() == rows

    # A re-run's rows for some sources win; the end of the job folds all into one file.
    manifest.write_part([row("img005", "59.000", "error")], output, None)
    table = manifest.compact(output, None)
    (only,) = manifest.list_parts(output, None)
    assert table.num_rows == 60 and table.to_pylist()[5]["status"] == "error"
    assert manifest.read(output, None).equals(table)
    assert manifest.compact(output, None).equals(table)  # nothing to fold: nothing written
    assert manifest.list_parts(output, None) == [only]


def test_a_compacted_part_and_the_parts_it_replaced_read_as_one(output) -> None:
    """A job killed between writing a compacted part and removing its parts leaves rows
    twice; they read once."""
    rows = [row(f"img{i}", f"0{i}.000") for i in range(6)]
    manifest.write_part(rows, output, None)
    manifest.write_part(rows[:3], output, None)
    assert manifest.read(output, None).to_pylist() == rows
    assert manifest.compact(output, None).to_pylist() == rows
    assert len(manifest.list_parts(output, None)) == 1


def test_a_compaction_whose_write_fails_loses_no_row(output, monkeypatch) -> None:
    """The compacted part is written before the parts it replaces are removed: a write that
    fails leaves every part, and every row reads back."""
    from jobs import storage

    rows = [row(f"img{i}", f"0{i}.000") for i in range(4)]
    manifest.write_part(rows[:2], output, None)
    manifest.write_part(rows[2:], output, None)
    parts = manifest.list_parts(output, None)

    def refuse(url, data, s3=None):
        raise PermissionError(f"refused: {url}")

    monkeypatch.setattr(storage, "write_bytes", refuse)
    with pytest.raises(PermissionError):
        manifest.compact(output, None)
    monkeypatch.undo()
    assert manifest.list_parts(output, None) == parts
    assert manifest.read(output, None).to_pylist() == rows


def test_storage_refusing_a_fold_costs_a_warning_not_the_job(tmp_path, caplog) -> None:
    output = tmp_path / "out"
    table, url = manifest.write_part([row("img0", "00.000")], str(output), None)
    broken = tmp_path / "broken"  # its parts folder is a file: nothing can be written there
    (broken / manifest.WORK_DIR).mkdir(parents=True)
    (broken / manifest.PARTS_DIR).write_bytes(b"")
    compactor = manifest.Compactor(str(broken), None, every_rows=1)
    compactor.add(manifest.with_part(table, url))
    assert "not compacted" in caplog.text
    assert manifest.list_parts(str(output), None) == [url]  # the part is kept
    (broken / manifest.PARTS_DIR).unlink()  # storage is back: the next fold takes the part
    compactor.fold()
    assert manifest.list_parts(str(output), None) == []
    assert manifest.read(str(broken), None).equals(table)


def test_output_folders_named_like_partitions_and_unreadable_parts(tmp_path, caplog) -> None:
    """Folders named key=value in OUTPUT's path are not columns; a part cut short is skipped
    with a warning (its inputs are done again), and the next compaction removes it."""
    output = str(tmp_path / "status=old" / "time=9" / "out")
    rows = [row("a", "01.000"), row("b", "02.000", "error")]
    manifest.write_part(rows[:1], output, None)
    manifest.write_part(rows[1:], output, None)
    cut = tmp_path / "status=old" / "time=9" / "out" / manifest.PARTS_DIR / "part-cut.parquet"
    cut.write_bytes(b"PAR1")
    assert manifest.read(output, None).to_pylist() == rows
    assert "part-cut.parquet unreadable" in caplog.text
    assert manifest.compact(output, None).to_pylist() == rows
    assert not cut.exists() and len(manifest.list_parts(output, None)) == 1
