"""The 134x512x512 chest benchmark volume, rebuilt deterministically from ``fullscan/lung1``.

lung1 is 48 axial slices of 5 mm; linear interpolation along z onto 134 slices over the same
extent (spacing ``47 * 5 / 133`` mm, first and last slice centres kept) gives a volume the size
of a thin-slice chest CT.  The label is resampled with nearest neighbour.

    python Testing/benchmarks/chest_volume.py OUTDIR     # writes OUTDIR/chest134.nii.gz (+ _label)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

N_SLICES = 134


def data_root() -> Path:
    return Path(os.environ.get("LESIONSEG_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def build_chest134(outdir: str | os.PathLike, force: bool = False) -> Path:
    """Write ``chest134.nii.gz`` and ``chest134_label.nii.gz`` into ``outdir``; return the image path."""
    import SimpleITK as sitk

    src = data_root() / "fullscan" / "lung1"
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    image_path = out / "chest134.nii.gz"
    if image_path.exists() and not force:
        return image_path
    for name, interp, suffix in (("image", sitk.sitkLinear, ""), ("label", sitk.sitkNearestNeighbor, "_label")):
        img = sitk.ReadImage(str(src / f"{name}.nii.gz"))
        sx, sy, sz = img.GetSpacing()
        nx, ny, nz = img.GetSize()
        spacing = (sx, sy, sz * (nz - 1) / (N_SLICES - 1))
        res = sitk.Resample(img, (nx, ny, N_SLICES), sitk.Transform(), interp, img.GetOrigin(), spacing, img.GetDirection(), 0, img.GetPixelID())
        tmp = out / f".chest134{suffix}.tmp.nii.gz"
        sitk.WriteImage(res, str(tmp), useCompression=True, compressionLevel=1)
        os.replace(tmp, out / f"chest134{suffix}.nii.gz")
    return image_path


if __name__ == "__main__":
    print(build_chest134(sys.argv[1] if len(sys.argv) > 1 else "runs/bench", force=True))
