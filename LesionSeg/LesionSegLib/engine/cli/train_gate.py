"""``lesionseg train-gate -o DIR``: train and calibrate the cascade slab gate (see ``gate/train.py``)."""
from __future__ import annotations


def register(sub) -> None:
    from ..gate.train import add_arguments, run

    sp = sub.add_parser("train-gate", help="train the cascade gate (slab classifier) and calibrate it for >= 95%% recall")
    add_arguments(sp)
    sp.set_defaults(func=run)
