"""Where the shared CT data lives, and the fixed train/validation split."""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import LesionSegError

REPO_ROOT = Path(__file__).resolve().parents[3]

#: Fixed split of the 41 soft-tissue-sarcoma CTs (documented in README and model cards).
STS_TRAIN = [f"STS_{i:03d}" for i in range(1, 34)]
STS_VAL = [f"STS_{i:03d}" for i in range(34, 42)]


def data_root() -> Path:
    """``$LESIONSEG_DATA``, else ``../shared/data`` beside the repository."""
    env = os.environ.get("LESIONSEG_DATA")
    if env:
        return Path(env).expanduser().resolve()
    beside = (REPO_ROOT.parent / "shared" / "data").resolve()
    if beside.exists():
        return beside
    return Path("../shared/data").resolve()


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    image: Path
    label: Path


def cases(group: str | None = None, root: Path | None = None) -> list[Case]:
    """Cases listed in ``manifest.csv`` (optionally only one group: sts, fullscan, lidc)."""
    root = root or data_root()
    manifest = root / "manifest.csv"
    out = []
    with open(manifest, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if group and row["split_dir"] != group:
                continue
            d = root / row["split_dir"] / row["case"]
            out.append(Case(row["case"], row["split_dir"], d / "image.nii.gz", d / "label.nii.gz"))
    return out


class UnknownCaseError(LesionSegError, KeyError):
    """A case name the data folder's manifest does not hold (a KeyError too, for lookups)."""

    def __str__(self) -> str:  # a KeyError would show its message in quotes
        return str(self.args[0]) if self.args else ""


def case(name: str, root: Path | None = None) -> Case:
    for c in cases(root=root):
        if c.name == name:
            return c
    raise UnknownCaseError(f"case {name!r} is not in the manifest of the data folder {root or data_root()}")


#: The bundled sample CT (a CC BY 3.0 validation case, see ``LesionSegLib/sample/ATTRIBUTION.md``):
#: ``lesionseg segment --sample`` and Slicer's Sample Data module use it.
SAMPLE_NAME = "STS_041"
SAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "sample" / SAMPLE_NAME / "image.nii.gz"
