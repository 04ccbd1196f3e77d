"""End-to-end JPEG colorization per GPU: `jobs.colorize_jpeg.JpegColorizer`, bytes to bytes.

    python bench/colorize_gpu.py                  (GPU: about 2 minutes with compilation)
    python bench/colorize_gpu.py --small          (CPU: Pillow as the codec, tiny sizes)

What the colorize job's model actor does with a batch of JPEG files on a GPU: nvJPEG decode
(EXIF orientation applied), L at full size, L resized to 256 for the released network
(32.2M parameters, random weights) in bf16 autocast and channels_last, annealed mean
(T = 0.38), bilinear upsampling of ab to full size, Lab -> sRGB with the chroma gamut
mapping, nvJPEG encode at quality 90 (or libjpeg-turbo on CPU threads: `--encode-threads`,
for the small images and, with `--cpu-encode-pieces`, for a share of the pieces whole),
bytes back on the host. Inputs are the workloads of
``shared_bench/gpu_colorize_anchor.py``: gray JPEGs (quality 90) of 256 x 256 in batches of
256, and 1024 x 768 in batches of 64, each timed over one untimed and one timed pass over the
files, eager and compiled (the model, and the Lab steps before and after it), each batch in
one piece and in pipelined pieces (`--chunks`, see `JpegColorizer`). Run the anchor in the
same call to compare.

``--stages`` also times one batch's steps apart (median of 5, synchronised): nvJPEG decode,
L and its resize (`_prepare`), the network with the annealed mean, the full-size
reassembly (`_finish`, chroma gamut search) and the same with RGB clipping instead (what
the anchor does), nvJPEG encode and the CPU threads' (the largest `--encode-threads`), and
each encoder again in a thread while the network runs three times on another stream (the
overlap the pieces rely on). Compiled where the mode list has "compiled".
Prints one JSON document; writes ``$OUT/colorize_gpu.json`` when OUT is set, after every
measurement (a run cut short by a time limit keeps what it measured).
"""

from __future__ import annotations

import argparse
import functools
import io
import itertools
import json
import os
import threading
import time

import timing  # noqa: F401  (first: pins thread pools to 1 before numpy and torch load)

# isort: split

import numpy as np
import torch
from PIL import Image
from timing import median_ms

from colorcore.model import ColorizationNet, ModelConfig
from jobs.colorize import predict_ab
from jobs.colorize_jpeg import (
    CPU_ENCODE_MAX_PX,
    JpegColorizer,
    _finish,
    _prepare,
    cpu_encoder,
    default_codec,
)
from jobs.runtime import Precision

QUALITY = 90
WORKLOADS = ((256, 256, 512, 256), (1024, 768, 256, 64))  # width, height, files, batch
SMALL_WORKLOADS = ((64, 64, 8, 4), (96, 72, 8, 4))


def gray_jpegs(count: int, width: int, height: int) -> list[bytes]:
    """Smooth gray patterns with grain, as scans look to a JPEG codec."""
    yy, xx = np.mgrid[0:height, 0:width]
    files = []
    for i in range(count):
        noise = np.random.default_rng(i).normal(0, 8, (height, width))
        pixels = np.sin(xx / (17 + i)) * 60 + np.cos(yy / 23) * 50 + 128 + noise
        buffer = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).convert("RGB").save(
            buffer, "JPEG", quality=QUALITY
        )
        files.append(buffer.getvalue())
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (CPU check)")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--chunks", default="4,1", help="pieces per batch, to compare")
    parser.add_argument(
        "--encode-threads",
        default=f"0,{max(1, (os.cpu_count() or 2) - 1)}",  # the job's default on one GPU
        help="encoders to compare: 0 the codec's own (nvJPEG); N CPU threads (cpu_encoder) for "
        "the images of at most --cpu-encode-max-px pixels, the codec for the larger",
    )
    parser.add_argument("--cpu-encode-max-px", type=int, default=CPU_ENCODE_MAX_PX)
    parser.add_argument(
        "--cpu-encode-pieces",
        default="0,0.5",
        help="shares of the pieces the CPU threads encode whole, beside the codec's, to "
        "compare (with threads and more than one piece; it changes only the images above "
        "--cpu-encode-max-px, the codec's otherwise)",
    )
    parser.add_argument("--stages", action="store_true", help="also each step of a batch apart")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precision = Precision(device, torch.bfloat16 if cuda else None, "benchmark")
    if cuda:
        torch.backends.cudnn.benchmark = True
    model = ColorizationNet(ModelConfig()).eval().to(device, memory_format=torch.channels_last)
    result: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu",
                    "torch": torch.__version__}  # fmt: skip
    for width, height, count, batch in SMALL_WORKLOADS if args.small else WORKLOADS:
        files = gray_jpegs(count, width, height)
        if args.stages:
            compiled = "compiled" in args.modes.split(",")
            threads = max(int(t) for t in args.encode_threads.split(","))
            stages = stage_ms(model, precision, files[:batch], compiled=compiled, threads=threads)
            result[f"{width}x{height}_stages_ms"] = stages
            print(json.dumps({f"{width}x{height}_stages_ms": stages}), flush=True)
            save(result)
        for mode, chunks, threads, pieces in itertools.product(
            args.modes.split(","), args.chunks.split(","), args.encode_threads.split(","),
            args.cpu_encode_pieces.split(","),
        ):  # fmt: skip
            if float(pieces) and (threads == "0" or chunks == "1"):
                continue  # no threads to share pieces with, or no pieces
            colorizer = JpegColorizer(model, precision, infer_px=256, temperature=0.38,
                                      quality=QUALITY, compile=mode == "compiled",
                                      chunks=int(chunks), encode_threads=int(threads),
                                      cpu_encode_max_px=args.cpu_encode_max_px,
                                      cpu_encode_pieces=float(pieces))  # fmt: skip
            out_bytes = 0
            for timed in (False, True):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for i in range(0, count, batch):
                    chunk = files[i : i + batch]
                    out = colorizer(chunk, [b""] * len(chunk))
                    assert all(o is not None for o in out)
                    out_bytes += sum(len(o) for o in out) if timed else 0
                if cuda:
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
            key = f"{width}x{height}_{mode}_chunks{chunks}" + (f"_cpu{threads}" * (threads != "0"))
            key += f"_pieces{pieces}" * (float(pieces) > 0)
            result[key + "_img_s"] = count / seconds
            result[key + "_kb_out"] = out_bytes / count / 1024
            print(json.dumps({key: result[key + "_img_s"]}), flush=True)
            save(result)
    if cuda:
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(result))
    save(result)


@torch.inference_mode()
def stage_ms(
    model, precision: Precision, files: list[bytes], *, compiled: bool, threads: int
) -> dict:
    """Milliseconds of each step of `JpegColorizer` for one batch of `files`, run apart."""
    device = precision.device
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    compile_ = torch.compile if compiled else (lambda fn: fn)
    forward, prepare = compile_(model), compile_(_prepare)
    finish, finish_clipped = compile_(_finish), compile_(functools.partial(_finish, gamut="clip"))
    codec = default_codec(device)
    tensors = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files]
    rgb_N3HW = torch.stack(codec.decode(tensors))
    l_N1HW, l_N1SS = prepare(rgb_N3HW, 256)
    ab_N2ss = predict_ab(forward, l_N1SS, 0.38, precision)
    images = list(finish(l_N1HW, ab_N2ss).contiguous())  # as `JpegColorizer` hands them over

    def network() -> torch.Tensor:
        return predict_ab(forward, l_N1SS, 0.38, precision)

    out = {
        "decode": median_ms(lambda: codec.decode(tensors), 5, sync=sync),
        "prepare": median_ms(lambda: prepare(rgb_N3HW, 256), 5, sync=sync),
        "network": median_ms(network, 5, sync=sync),
        "finish_chroma": median_ms(lambda: finish(l_N1HW, ab_N2ss).contiguous(), 5, sync=sync),
        "finish_clip": median_ms(
            lambda: finish_clipped(l_N1HW, ab_N2ss).contiguous(), 5, sync=sync
        ),
        "encode": median_ms(lambda: codec.encode(images, QUALITY), 5, sync=sync),
    }
    if threads:
        encode_cpu = cpu_encoder(threads)
        out[f"encode_cpu{threads}"] = median_ms(lambda: encode_cpu(images, QUALITY), 5, sync=sync)
    if device.type == "cuda":  # each encoder in a thread while the network runs 3 times
        stream = torch.cuda.Stream(device)

        def networks() -> None:
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(3):
                    network()
            stream.synchronize()

        def beside(encode) -> tuple[float, float]:
            """(ms until `encode`, in a thread as `JpegColorizer` runs it, was done; ms until
            the networks in this thread were)."""
            encoded = []

            def encoding() -> None:
                encode(images, QUALITY)
                encoded.append(time.perf_counter())

            thread = threading.Thread(target=encoding)
            torch.cuda.synchronize()
            start = time.perf_counter()
            thread.start()
            networks()
            networked = time.perf_counter()
            thread.join()
            return 1e3 * (encoded[0] - start), 1e3 * (networked - start)

        out["network_x3"] = median_ms(networks, 3, sync=sync)
        encoders = {"encode": codec.encode}
        if threads:
            encoders[f"encode_cpu{threads}"] = encode_cpu
        for name, encode in encoders.items():
            out[f"{name}_beside_network"], out[f"network_x3_beside_{name}"] = beside(encode)
    return out


def save(result: dict) -> None:
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "colorize_gpu.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
