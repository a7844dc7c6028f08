"""Write the UCI hand-written digits (scikit-learn's bundled copy, 1,797 images of 8x8) as MNIST-style IDX
files, upsampled to 28x28, so `--data mnist:DIR` reads them: 1,437 training and 360 test images after a
fixed shuffle (seed 0).

Usage: pip install scikit-learn && python results/bootstrap/make_digits_idx.py DIR
(scikit-learn is needed only here; dsctl does not depend on it.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _write(path: Path, array: np.ndarray, magic: int) -> None:
    with path.open("wb") as f:
        f.write(magic.to_bytes(4, "big"))
        for dim in array.shape:
            f.write(int(dim).to_bytes(4, "big"))
        f.write(array.tobytes())


def main(out: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)[:, 0]
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    labels = digits.target.astype(np.uint8)
    perm = np.random.RandomState(0).permutation(len(labels))
    images, labels = images[perm], labels[perm]
    n = 1437
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "train-images-idx3-ubyte", images[:n], 2051)
    _write(out / "train-labels-idx1-ubyte", labels[:n], 2049)
    _write(out / "t10k-images-idx3-ubyte", images[n:], 2051)
    _write(out / "t10k-labels-idx1-ubyte", labels[n:], 2049)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
