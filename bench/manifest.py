"""What the colorize job's manifest costs a resumed run: reading the parts back.

    python bench/manifest.py                 (local folder; about 1 minute on 2 cores)
    python bench/manifest.py --s3 --rows 20000   (a moto S3 server on loopback)

The job's writes leave one manifest part per batch (`jobs.colorize_manifest`). Measured on the
same rows (``--rows``, parts of ``--batch`` rows, as batches of 8 leave them on CPUs):

- baseline: reading the parts as the writes left them, one per batch (what a run killed
  before any compaction, or the job before it compacted, hands to its re-run);
- the driver folding the parts as the job does while it runs (`Compactor`, its defaults),
  and what it leaves: the number of files and the time to read them;
- the end of the job folding everything into one file (`compact`), and reading that.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

from jobs import colorize_manifest as manifest


def rows_of(batch: int, start: int) -> list[dict]:
    return [
        {
            "source": f"s3://archive/box{i // 1000:04d}/scan{i:07d}.tif",
            "output": f"box{i // 1000:04d}/scan{i:07d}.tif",
            "status": "ok",
            "reason": "",
            "time": f"2026-11-29T10:{i // 60000 % 60:02d}:{i // 1000 % 60:02d}.{i % 1000:03d}Z",
            "pages": 1,
            "width_px": 1024,
            "height_px": 768,
            "model_sha256": "f" * 64,
            "temperature": 0.38,
            "seconds": 0.25,
        }
        for i in range(start, start + batch)
    ]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def measure(output: str, rows: int, batch: int) -> None:
    starts = range(0, rows, batch)
    parts, write_s = timed(
        lambda: [
            manifest.write_part(rows_of(min(batch, rows - i), i), output, None) for i in starts
        ]
    )
    print(f"{len(parts)} parts of {batch} rows written in {write_s:.1f}s (the job's writes)")
    table, read_parts_s = timed(lambda: manifest.read(output, None))
    assert table.num_rows == rows
    print(f"baseline: read back from {len(parts)} parts in {read_parts_s:.2f}s")

    compactor = manifest.Compactor(output, None)

    def fold_all() -> None:
        for table, url in parts:
            compactor.add(manifest.with_part(table, url))
        compactor.fold()

    _, fold_s = timed(fold_all)
    left = manifest.list_parts(output, None)
    table, read_folded_s = timed(lambda: manifest.read(output, None))
    assert table.num_rows == rows
    print(
        f"driver folds: {fold_s:.2f}s for {rows} rows ({fold_s / rows * 1e6:.1f} us a row, "
        f"{fold_s / write_s:.2f}x the writes' time); leaves {len(left)} file(s), read back in "
        f"{read_folded_s:.3f}s ({read_parts_s / read_folded_s:.0f}x faster than the parts)"
    )
    table, compact_s = timed(lambda: manifest.compact(output, None))
    assert table.num_rows == rows and len(manifest.list_parts(output, None)) == 1
    _, read_one_s = timed(lambda: manifest.read(output, None))
    print(
        f"end of job: compacted into one file in {compact_s:.3f}s, read back in "
        f"{read_one_s:.3f}s ({read_parts_s / read_one_s:.0f}x faster than the parts)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--s3", action="store_true", help="a moto S3 server on loopback")
    args = parser.parse_args()
    if not args.s3:
        with tempfile.TemporaryDirectory() as root:
            measure(os.path.join(root, "out"), args.rows, args.batch)
        return
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL_S3=f"http://{host}:{port}",
    )  # fmt: skip
    boto3.client("s3").create_bucket(Bucket="bench")
    try:
        measure("s3://bench/out", args.rows, args.batch)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
