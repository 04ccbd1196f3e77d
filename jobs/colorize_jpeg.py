"""JPEG bytes in, colorized JPEG bytes out, with every step on the model's device.

On a GPU, nvJPEG (``torchvision.io``, imported only here and only on CUDA) decodes a batch of
JPEGs, and everything after stays on the device: L at full size, L resized for the network,
the network under autocast, the annealed mean, the full-size reassembly with the chroma
gamut mapping (`jobs.colorize.reassemble`), and encoding: by nvJPEG, an image crossing the
bus twice, compressed, with no CPU core touching its pixels (on CPUs, JPEG work alone caps 16
cores at about 2,000 images/s for 1024 x 768); or, for small images when the colorizer has
CPU threads for it (`cpu_encoder`), by libjpeg-turbo after one uncompressed copy to the
host, which is faster there and frees the GPU. The colour math is the CPU path's, so the
two paths differ only by their JPEG codecs' rounding.

`jobs.colorize` routes a file here when the header check (`eligible`) passes: a single-frame
8-bit JPEG in gray or YCbCr colour, within the pixel limit, whose pixels are sRGB's or in a
space converted on the device (a gray ICC profile's levels looked up; a matrix profile's
curves and matrix, and back for the output: `jobs.icc.lookup`). CMYK / YCCK JPEGs, 12-bit
ones, those of other profiles and everything that is not a JPEG take the CPU path. Metadata
(EXIF without orientation, with the provenance tag; ICC; XMP; IPTC) is prepared from the
header on the CPU as ready APP segments (`jobs.picture_files.app_segments`) and spliced into
the encoded file. A batch that the codec refuses as a whole is decoded image by image, and
an image that still fails is handed back (None) for the CPU path to colorize or to record
with its reason.

Legend: N batch, H, W full size, S network input side, s = S / 4 network output side.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from jobs import icc
from jobs.colorize import network_input, predict_ab, reassemble
from jobs.images import each_or_none, jpeg_size, whole_jpeg
from jobs.picture_files import page_profile, upright, with_segments
from jobs.runtime import Precision

# ---------------------------------------------------------------- routing


def eligible(data: bytes, image) -> bool:
    """Whether a JPEG file (its bytes and the lazily opened PIL image) can take the device
    path: an 8-bit JPEG in gray or YCbCr colour that ends with its EOI marker, whose pixels
    are sRGB's (no ICC profile, or one of sRGB) or in a space the device converts from and
    back (a gray profile, or a matrix one: `jobs.icc.lookup`). CMYK and YCCK JPEGs,
    multi-picture MPO files and pictures of other profiles (tables of colours) are the CPU
    path's; so are files cut short, which nvJPEG would decode without complaint (gray below
    the cut) and the CPU path reports, and files whose first frame header (nvJPEG's) is not
    the one Pillow read and the pixel limit checked (its last)."""
    if not (image.format == "JPEG" and image.mode in ("L", "RGB")):
        return False
    if jpeg_size(data) != image.size[::-1]:
        return False
    profile = page_profile(image)
    return whole_jpeg(data) and (not icc.converts(profile) or icc.lookup(profile) is not None)


# ---------------------------------------------------------------- codecs


@dataclass(frozen=True)
class Codec:
    """decode: JPEG files (uint8 1-D tensors) -> (3, H, W) uint8 images on the device, as
    stored (EXIF orientation not applied), raising if any file fails; encode: such images,
    contiguous and finished on the device (the caller waits for them: nvJPEG encodes on a
    stream of its own that does not wait for theirs), -> JPEG bytes at a quality."""

    decode: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    encode: Callable[[list[torch.Tensor], int], list[bytes]]


def nvjpeg_codec(device: torch.device) -> Codec:
    """nvJPEG through torchvision (CUDA only): batched decode and encode. torchvision 0.26
    ignores ``apply_exif_orientation`` when decoding on the GPU (seen on an H200), so the
    orientation is applied by `JpegColorizer`, the same way for every codec."""
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    def decode(files: list[torch.Tensor]) -> list[torch.Tensor]:
        return decode_jpeg(
            files, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=False
        )

    def encode(images: list[torch.Tensor], quality: int) -> list[bytes]:
        files = encode_jpeg(images, quality=quality)
        data = torch.cat(files).cpu().numpy().tobytes()  # one copy to the host, not one a file
        ends = itertools.accumulate(len(f) for f in files)
        return [data[end - len(f) : end] for f, end in zip(files, ends, strict=True)]

    return Codec(decode, encode)


def pil_codec(device: torch.device) -> Codec:
    """The same contract with Pillow on the CPU, images moved to ``device``: for machines
    without nvJPEG, and for checking the device path's orchestration anywhere."""
    import numpy as np
    from PIL import Image

    def decode(files: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for data in files:
            image = Image.open(io.BytesIO(data.numpy().tobytes()))
            rgb = np.asarray(image.convert("RGB")).transpose(2, 0, 1).copy()
            out.append(torch.from_numpy(rgb).to(device))
        return out

    def encode(images: list[torch.Tensor], quality: int) -> list[bytes]:
        out = []
        for rgb in images:
            buffer = io.BytesIO()
            pixels = rgb.permute(1, 2, 0).cpu().numpy()
            Image.fromarray(pixels).save(buffer, "JPEG", quality=quality, subsampling=0)
            out.append(buffer.getvalue())
        return out

    return Codec(decode, encode)


def default_codec(device: torch.device) -> Codec:
    return nvjpeg_codec(device) if device.type == "cuda" else pil_codec(device)


def cpu_encoder(threads: int) -> Callable[[list[torch.Tensor], int], list[bytes]]:
    """A `Codec.encode` on `threads` CPU threads with libjpeg-turbo (OpenCV; 4:4:4, as nvJPEG
    writes), for images on any device: the images of each size cross to the host in one
    copy, as BGR rows, into page-locked memory. On a GPU this takes the encoder's work off
    the device, where nvJPEG, syncing the host once a file, holds up the network beside it;
    it costs the pixels' copy across the bus (2.4 MB for 1024 x 768) and CPU cores."""
    import cv2

    pool = ThreadPoolExecutor(threads, thread_name_prefix="jpeg-encode-cpu")
    streams = threading.local()  # each caller's: its copies and the sync that waits for them

    def encode(images: list[torch.Tensor], quality: int) -> list[bytes]:
        params = [
            cv2.IMWRITE_JPEG_QUALITY, quality,
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
        ]  # fmt: skip

        def one(bgr_HW3) -> bytes:
            ok, data = cv2.imencode(".jpg", bgr_HW3, params)
            if not ok:
                raise ValueError(f"OpenCV could not encode a {bgr_HW3.shape} image")
            return data.tobytes()

        if not images:
            return []
        device = images[0].device
        cuda = device.type == "cuda"
        stream = None
        if cuda:
            mine = streams.__dict__.setdefault("by_device", {})
            if device not in mine:
                mine[device] = torch.cuda.Stream(device)
            stream = mine[device]
        by_size: dict[tuple, list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            by_size[tuple(image.shape)].append(i)
        copies = []
        with _on(stream):
            for rows in by_size.values():
                # (n, H, W, 3) in one kernel, then its channels reversed in one more
                hwc = torch.stack([images[i].permute(1, 2, 0) for i in rows]).flip(-1)
                host = torch.empty(hwc.shape, dtype=torch.uint8, pin_memory=cuda)
                copies.append((rows, host.copy_(hwc, non_blocking=cuda)))
            if stream is not None:
                stream.synchronize()
        pixels: list = [None] * len(images)
        for rows, host in copies:
            for i, bgr_HW3 in zip(rows, host.numpy(), strict=True):
                pixels[i] = bgr_HW3
        return list(pool.map(one, pixels))

    return encode


# ---------------------------------------------------------------- the batch


# Images of at most this many pixels go to the CPU encoder when the colorizer has threads
# for one; larger ones to the codec's. On an H200 with 16 cores (2026-11-30), libjpeg-turbo
# on 16 threads took 0.07 ms an image at 256 x 256 against nvJPEG's 0.17 (which syncs the
# host once a file), and the whole path ran 1.38x faster with it; at 1024 x 768 both took
# 0.5 ms an image, and the whole path ran 0.80x as fast (the threads crowd the one that
# drives the GPU): the two cross near 600k pixels.
CPU_ENCODE_MAX_PX = 1 << 19

# Pixels through the full-size steps at once: their fp32 planes and temporaries (a few GB
# at this size) stay well inside a GPU's memory whatever the scans' sizes.
GROUP_PX = 1 << 25


class JpegColorizer:
    """A batch of JPEG files -> colorized JPEG files (None where the codec failed).

    A batch goes through in `chunks` pieces, pipelined: while the network works on one piece,
    the next one is decoded and the one before is encoded (a thread of its own; torchvision's
    codec calls release the GIL). On a GPU that hides most of the codecs' time, which the
    JPEG hardware decoder and nvJPEG's encoder, syncing the host once a file, would
    otherwise add to the network's. Decoding runs on a CUDA stream of its own and the colour
    work on another, so that neither waits for the other's queue; the encoder waits for each
    piece's event. With `encode_threads`, that many CPU threads encode the images of at most
    `cpu_encode_max_px` pixels (`cpu_encoder`), the codec the larger ones; and with
    `cpu_encode_pieces` > 0, that share of the pieces (dealt evenly: 0.5, every other one)
    is encoded whole by the threads, from a thread of its own, at the same time as the codec
    encodes the large images of another piece (pieces of small images only are the threads'
    anyway). A large image holds one of the threads as long as its encode takes, so
    splitting one piece between the encoders would not make it much shorter; whole pieces
    make the two encoders a pipeline stage twice as wide."""

    def __init__(
        self,
        model: torch.nn.Module,
        precision: Precision,
        *,
        infer_px: int,
        temperature: float,
        quality: int,
        codec: Codec | None = None,
        compile: bool = False,
        chunks: int = 4,
        group_px: int = GROUP_PX,
        encode_threads: int = 0,
        cpu_encode_max_px: int = CPU_ENCODE_MAX_PX,
        cpu_encode_pieces: float = 0.0,
    ) -> None:
        if chunks < 1 or group_px < 1 or encode_threads < 0:
            raise ValueError(
                f"chunks and group_px must be >= 1, encode_threads >= 0, got {chunks}, "
                f"{group_px}, {encode_threads}"
            )
        if not 0.0 <= cpu_encode_pieces <= 1.0 or (cpu_encode_pieces and not encode_threads):
            raise ValueError(
                f"cpu_encode_pieces must lie in [0, 1], and above 0 it needs encode_threads, "
                f"got {cpu_encode_pieces} with {encode_threads} threads"
            )
        self.precision = precision
        self.infer_px, self.temperature, self.quality = infer_px, temperature, quality
        self.chunks, self.group_px = chunks, group_px
        self.codec = codec or default_codec(precision.device)
        self.cpu_encode = cpu_encoder(encode_threads) if encode_threads else None
        self.cpu_side = ThreadPoolExecutor(1, thread_name_prefix="jpeg-encode-cpu")
        self.cpu_pieces = ThreadPoolExecutor(1, thread_name_prefix="jpeg-encode-cpu-pieces")
        self.cpu_encode_max_px, self.cpu_encode_pieces = cpu_encode_max_px, cpu_encode_pieces
        self.forward = torch.compile(model) if compile else model
        self.prepare = torch.compile(_prepare) if compile else _prepare
        self.finish = torch.compile(_finish) if compile else _finish
        cuda = precision.device.type == "cuda"
        self.decode_stream = torch.cuda.Stream(precision.device) if cuda else None
        self.compute_stream = torch.cuda.Stream(precision.device) if cuda else None
        self.encoder = ThreadPoolExecutor(1, thread_name_prefix="jpeg-encode")
        # `icc.lookup`s on the device, of the profiles used last (a few an archive, as a rule)
        self.profiles: icc.ProfileCache[torch.Tensor | icc.Shaper] = icc.ProfileCache(16)

    def __call__(
        self,
        files: Sequence[bytes],
        segments: Sequence[bytes],
        orientations: Sequence[int] | None = None,
        profiles: Sequence[bytes] | None = None,
    ) -> list[bytes | None]:
        """Colorized files, each with its `segments` spliced in; `orientations` are the
        files' EXIF orientation tags (1 to 8; `jobs.images.exif_orientation`), applied after
        decoding so that outputs are upright; `profiles`, where a file's is not empty, the
        ICC profile its pixels are in (one `jobs.icc.lookup` serves): they are converted into
        sRGB for the network, and a colour picture's output back into the profile."""
        turns = list(orientations) if orientations else [1] * len(files)
        profiles = list(profiles) if profiles else [b""] * len(files)
        parts = _pieces(len(files), self.chunks)
        out: list[bytes | None] = [None] * len(files)
        encoding: list[tuple[list[int], Future]] = []
        try:
            decoded = self._decode_piece(files, turns, parts[0]) if parts else []
            for k, part in enumerate(parts):
                rows = [part[i] for i, image in enumerate(decoded) if image is not None]
                images = [image for image in decoded if image is not None]
                spaces = [profiles[i] for i in rows]
                predicted = self._predict(images, spaces) if images else None
                # The next piece is decoded while the network works on this one: the rest
                # of this piece's steps may wait for the device (eager chroma search).
                if k + 1 < len(parts):
                    decoded = self._decode_piece(files, turns, parts[k + 1])
                if predicted is not None:
                    colorized, ready = self._finish_piece(images, spaces, *predicted)
                    # piece k is the CPU threads' when the running count of their share
                    # steps up there: 0.5 deals them every other piece, 1/3 every third
                    share = self.cpu_encode_pieces
                    if int((k + 1) * share) > int(k * share):
                        job = self.cpu_pieces.submit(self._encode_on_cpu, colorized, ready)
                    else:
                        job = self.encoder.submit(self._encode, colorized, ready)
                    encoding.append((rows, job))
        finally:  # none left running on this call's images, whatever happened
            futures.wait([job for _, job in encoding])
        for rows, job in encoding:
            for i, data in zip(rows, job.result(), strict=True):
                if data is not None:
                    out[i] = with_segments(data, segments[i]) if segments[i] else data
        return out

    def _decode_piece(
        self, files: Sequence[bytes], turns: list[int], part: list[int]
    ) -> list[torch.Tensor | None]:
        """The piece's images, upright, on the decode stream (None where decoding failed)."""
        tensors = [torch.frombuffer(bytearray(files[i]), dtype=torch.uint8) for i in part]
        with _on(self.decode_stream):
            if self.decode_stream is not None:
                # The decoder writes on a stream of its own, into blocks this stream may
                # have freed with reads still queued (the last piece's flips): finish those.
                self.decode_stream.synchronize()
            images = each_or_none(self.codec.decode, tensors)  # a bad file fails the batch
            return [
                None if image is None else upright(image, turns[i])
                for i, image in zip(part, images, strict=True)
            ]

    @torch.inference_mode()
    def _predict(
        self, images: list[torch.Tensor], spaces: list[bytes]
    ) -> tuple[list[list[int]], list[torch.Tensor], torch.Tensor]:
        """Queues the network for upright (3, H, W) uint8 images (each in the space of its
        profile, see `__call__`) on the compute stream: (groups of images of one size, each
        group's full-size L, annealed-mean ab)."""
        with _on(self.compute_stream):
            if self.compute_stream is not None:
                self.compute_stream.wait_stream(self.decode_stream)
                for image in images:
                    image.record_stream(self.compute_stream)  # reused after its use there
            # Images of one size go through the full-size steps together, at most
            # `group_px` pixels at a time: large scans must not exhaust device memory.
            order = sorted(range(len(images)), key=lambda i: tuple(images[i].shape))
            groups = []
            for shape, same in itertools.groupby(order, key=lambda i: images[i].shape):
                same = list(same)
                per_group = max(1, self.group_px // (shape[-2] * shape[-1]))
                groups += [same[i : i + per_group] for i in range(0, len(same), per_group)]
            lightness, small = [], []
            for group in groups:
                if any(spaces[i] for i in group):  # sRGB in [0, 1], converted
                    stacked = torch.stack([self._in_srgb(images[i], spaces[i]) for i in group])
                else:
                    stacked = torch.stack([images[i] for i in group])
                l_N1HW, l_N1SS = self.prepare(stacked, self.infer_px)
                lightness.append(l_N1HW)
                small.append(l_N1SS)
            ab_N2ss = predict_ab(self.forward, torch.cat(small), self.temperature, self.precision)
        return groups, lightness, ab_N2ss

    def _lookup(self, profile: bytes, device: torch.device) -> torch.Tensor | icc.Shaper:
        return self.profiles.get(profile, lambda p: icc.lookup(p).to(device))

    def _in_srgb(self, image: torch.Tensor, profile: bytes) -> torch.Tensor:
        """A uint8 (3, H, W) image in the space of `profile` (sRGB's where empty) as sRGB in
        [0, 1]: a gray one's levels looked up, a colour one's through its curves."""
        if not profile:
            return image.float() / 255.0
        found = self._lookup(profile, image.device)
        levels = image.int()  # int32 indices: a third of int64's memory on a large scan
        if isinstance(found, torch.Tensor):
            return found[levels]
        linear_8bit = found.linear[:, ::257]  # the light of 8-bit level v is 16-bit 257 v's
        light_3HW = torch.stack([linear_8bit[c][levels[c]] for c in range(3)])
        return found.srgb_of_light(light_3HW.view(3, -1)).view(image.shape)

    def _converted_back(self, spaces: list[bytes], group: list[int], device) -> bool:
        """Whether a group has an image in a colour profile, whose output is converted back
        into it from full precision (`_in_profile`)."""
        return any(
            isinstance(self._lookup(spaces[i], device), icc.Shaper) for i in group if spaces[i]
        )

    def _in_profile(self, srgb_3HW: torch.Tensor, profile: bytes) -> torch.Tensor:
        """A colorized image, sRGB in [0, 1], as uint8 in the space of `profile` where it is
        a colour one (converted before rounding, as the CPU path does: from 8-bit sRGB the
        shadows of a pure power curve such as Adobe RGB's would skip levels), else sRGB."""
        found = self._lookup(profile, srgb_3HW.device) if profile else None
        if not isinstance(found, icc.Shaper):
            return srgb_3HW.mul(255.0).round_().to(torch.uint8)
        levels_3P = found.levels_of(srgb_3HW.reshape(3, -1))
        return ((levels_3P * 255 + 32767) // 65535).to(torch.uint8).view(srgb_3HW.shape)

    @torch.inference_mode()
    def _finish_piece(
        self,
        images: list[torch.Tensor],
        spaces: list[bytes],
        groups: list[list[int]],
        lightness: list[torch.Tensor],
        ab_N2ss: torch.Tensor,
    ) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
        """The colorized images, same sizes and order as `images`, and the CUDA event they
        are ready at."""
        out: list[torch.Tensor] = list(images)
        with _on(self.compute_stream):
            sizes = [len(g) for g in groups]
            for group, l_N1HW, ab_n2ss in zip(groups, lightness, ab_N2ss.split(sizes), strict=True):
                if self._converted_back(spaces, group, l_N1HW.device):  # sRGB, then rounded
                    srgb_N3HW = reassemble(l_N1HW, ab_n2ss)
                    for i, srgb_3HW in zip(group, srgb_N3HW, strict=True):
                        out[i] = self._in_profile(srgb_3HW, spaces[i]).contiguous()
                    continue
                rgb_N3HW = self.finish(l_N1HW, ab_n2ss).contiguous()  # nvJPEG reads it as is
                for i, rgb_3HW in zip(group, rgb_N3HW, strict=True):
                    out[i] = rgb_3HW
            if self.compute_stream is None:
                return out, None
            ready = torch.cuda.Event(blocking=True)  # the encoder sleeps on it
            ready.record(self.compute_stream)
        return out, ready

    def _encode_on_cpu(
        self, images: list[torch.Tensor], ready: torch.cuda.Event | None
    ) -> list[bytes | None]:
        """A piece's JPEG files from the CPU encoder alone, once its images are finished:
        file by file where it fails, None for a file that still fails."""
        if ready is not None:
            ready.synchronize()
        return each_or_none(lambda some: self.cpu_encode(some, self.quality), images)

    def _encode(
        self, images: list[torch.Tensor], ready: torch.cuda.Event | None
    ) -> list[bytes | None]:
        """The images' JPEG files once they are finished, the small ones from the CPU
        encoder when there is one, at the same time as the codec encodes the others; where an
        encoder fails, file by file, and None for a file that still fails (the CPU path takes
        it over)."""
        if ready is not None:
            ready.synchronize()  # the encoder's stream does not wait for the compute stream
        limit = self.cpu_encode_max_px if self.cpu_encode is not None else -1
        small = [i for i, image in enumerate(images) if image[0].numel() <= limit]
        large = [i for i, image in enumerate(images) if image[0].numel() > limit]
        out: list[bytes | None] = [None] * len(images)

        def encode_rows(encode: Callable[[list[torch.Tensor], int], list[bytes]], rows) -> None:
            part = [images[i] for i in rows]
            encoded = each_or_none(lambda some: encode(some, self.quality), part)
            for i, data in zip(rows, encoded, strict=True):
                out[i] = data

        # The CPU threads' share from a thread of its own: on a piece of mixed sizes both
        # encoders work at once.
        cpu_job = self.cpu_side.submit(encode_rows, self.cpu_encode, small) if small else None
        if large:
            encode_rows(self.codec.encode, large)
        if cpu_job is not None:
            cpu_job.result()
        return out


def _on(stream: torch.cuda.Stream | None):
    """The stream's context; none at all without a stream (CPU codecs touch no CUDA state)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _pieces(count: int, pieces: int) -> list[list[int]]:
    """range(count) in at most `pieces` consecutive parts whose sizes differ by at most one
    (two sizes at most: a compiled model sees few shapes)."""
    size, extra = divmod(count, pieces)
    bounds = [0]
    for k in range(pieces):
        bounds.append(bounds[-1] + size + (k < extra))
    return [list(range(a, b)) for a, b in itertools.pairwise(bounds) if b > a]


def _prepare(rgb_N3HW: torch.Tensor, infer_px: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 levels, or sRGB in [0, 1] already (`JpegColorizer._in_srgb`) -> `network_input`."""
    rgb_N3HW = rgb_N3HW if rgb_N3HW.is_floating_point() else rgb_N3HW.float() / 255.0
    return network_input(rgb_N3HW, infer_px)


def _finish(l_N1HW: torch.Tensor, ab_N2ss: torch.Tensor, gamut: str = "chroma") -> torch.Tensor:
    return reassemble(l_N1HW, ab_N2ss, gamut).mul(255.0).round().to(torch.uint8)
