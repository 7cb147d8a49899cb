"""``lesionseg train-gate -o DIR``: train and calibrate the cascade slab gate (see ``gate/train.py``)."""
from __future__ import annotations


def add_arguments(ap) -> None:
    ap.add_argument("-o", "--output", required=True, help="gate folder (gate.json + gate.safetensors)")
    ap.add_argument("--minutes", type=float, default=4.0, help="wall-clock training budget")
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--train", nargs="*", default=None, help="training cases (default STS_001-033)")
    ap.add_argument("--val", nargs="*", default=None, help="calibration cases (default STS_034-041)")
    ap.add_argument("--extra-cases", nargs="*", default=[], help="further training cases from the manifest, e.g. lung2")
    ap.add_argument("--slab", type=int, default=8, help="slab thickness in model-grid voxels")
    ap.add_argument("--margin", type=int, default=8, help="context voxels added on each side of an open run")
    ap.add_argument("--min-recall", type=float, default=0.95)
    ap.add_argument("--min-voxels", type=int, default=1, help="lesion voxels that make a slab positive")
    ap.add_argument("--model", default="sts-clcs", help="the model whose preprocessing (spacing, HU windows) the gate uses")
    ap.add_argument("--attach", default=None, metavar="MODEL", help="also write a model card: MODEL + this gate")
    ap.add_argument("--card-out", default=None, metavar="DIR",
                    help="folder of that card (default: the user model folder's NAME/VERSION, where retrain puts versions)")
    ap.add_argument("--name", default=None, help="NAME or NAME@VERSION of that card (default MODEL-gated; version: the folder's "
                                                 "under the user model folder, else the next free one)")
    ap.add_argument("--seed", type=int, default=0)


def _run(args) -> int:
    import sys

    from .common import output_problem

    for folder in filter(None, (args.output, args.card_out)):
        problem = output_problem(folder)  # now, not after the training budget
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    from ..gate.train import run  # torch and MONAI only when the command runs

    return run(args)


def register(sub) -> None:
    sp = sub.add_parser("train-gate", help="train the cascade gate (slab classifier) and calibrate it for >= 95%% recall")
    add_arguments(sp)
    sp.set_defaults(func=_run)
