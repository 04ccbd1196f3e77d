"""Writes colorcore/calibration_l.npz, the photos `colorcore.int8` calibrates on.

scikit-image's public-domain and CC0 sample photos (astronaut, chelsea, coffee, rocket),
each whole and its centre half, squeezed to 256x256 as the released demo resizes, as L in
[0, 100] stored as uint8 (L * 2.55). Run: `python scripts/make_calibration.py` (needs the
test extras, for scikit-image).
"""

from pathlib import Path

import numpy as np
from skimage import color, data, transform

SIZE = 256
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def main() -> None:
    views = []
    for name in PHOTOS:
        l_HW = color.rgb2lab(getattr(data, name)())[..., 0]
        h, w = l_HW.shape
        centre = l_HW[h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2]
        for view in (l_HW, centre):
            views.append(transform.resize(view, (SIZE, SIZE), order=3, anti_aliasing=True))
    l_u8 = np.clip(np.round(np.stack(views) * 2.55), 0, 255).astype(np.uint8)
    out = Path(__file__).resolve().parents[1] / "colorcore" / "calibration_l.npz"
    np.savez_compressed(out, l=l_u8)
    print(f"{out}: {l_u8.shape}, {out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
