"""A picture format whose decoding kills the process, as a decoder's crash on a malformed
file or the kernel's OOM killer would: registered in the Ray workers of the test session
(Ray's ``worker_process_setup_hook``, in conftest), so that a test can hand a job an input
that its workers die on. The test process itself does not read the format."""

from __future__ import annotations

import os
import signal

from PIL import Image, ImageFile

MAGIC = b"\x89CRASH-DECODE\r\n"  # Pillow judges by the first 16 bytes


class CrashingImage(ImageFile.ImageFile):
    format = "CRASHING"
    format_description = "a picture whose decoding kills the process"

    def _open(self) -> None:
        self._size = (16, 12)
        self._mode = "RGB"

    def load(self):
        os.kill(os.getpid(), signal.SIGKILL)


def register() -> None:
    Image.register_open(CrashingImage.format, CrashingImage, lambda head: head.startswith(MAGIC))
