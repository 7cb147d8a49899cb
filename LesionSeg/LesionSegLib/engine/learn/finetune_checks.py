"""Checks around a segmenter fine-tuning (used by :mod:`.finetune`): what the new network forgot
of its parent's domain, and keeping held-apart corrected cases out of the replay."""
from __future__ import annotations

import numpy as np

#: the base-domain check (:func:`base_domain_check`): the first replay cases, and the Dice drop
#: beyond which the summary and the Slicer panel say that the fine-tuned network forgets
BASE_CHECK_CASES = 3
FORGETTING_WARN = 0.05


def segmenter_dice(engine, x, y) -> float:
    """Dice (4 decimals) of ``engine``'s segmenter at p > 0.5 against ``y`` on one model-grid case
    (``x``: its image channels, ``y``: its (1, z, y, x) label, as :func:`.train_seg.load_training_case` gives)."""
    from ..evaluate.metrics import dice_score

    return round(dice_score(engine.runner.probability(x.float().numpy()) > 0.5, y[0].numpy() > 0), 4)


def base_domain_check(base, new, replay, names) -> dict | None:
    """How much of the parent's own domain the fine-tuned segmenter forgot: Dice (p > 0.5, on the
    model grid) of the parent's and of the new segmenter on the first :data:`BASE_CHECK_CASES`
    replay cases (``replay``: their ``(x, y)`` model-grid tensors; ``names``: their names).  These
    are, by default, the parent's training data, replayed during the fine-tuning, so the figures
    measure forgetting, not accuracy.  None without replay cases."""
    pairs = list(zip(names, replay))[:BASE_CHECK_CASES]
    if not pairs:
        return None
    before = {name: segmenter_dice(base, x, y) for name, (x, y) in pairs}
    after = {name: segmenter_dice(new, x, y) for name, (x, y) in pairs}
    return {"cases": [n for n, _ in pairs], "dice_before": before, "dice_after": after,
            "mean_before": round(float(np.mean(list(before.values()))), 4),
            "mean_after": round(float(np.mean(list(after.values()))), 4),
            "what": "segmenter Dice (p > 0.5, model grid) of the parent and of the fine-tuned network on the first replay "
                    "cases (by default the parent's own training split), replayed during the fine-tuning: forgetting, not accuracy"}


def forgetting_text(check: dict | None, routed: bool) -> str:
    """One line on the base-domain check (:func:`base_domain_check`); a warning when the mean Dice
    fell by more than :data:`FORGETTING_WARN`.  Empty without a check."""
    if not check:
        return ""
    b, a = check["mean_before"], check["mean_after"]
    text = f"parent's own cases ({', '.join(check['cases'])}): segmenter Dice {b:.3f} -> {a:.3f}"
    if b - a > FORGETTING_WARN:
        text += (" - the fine-tuned network forgets part of the parent's domain; "
                 + ("scans of that domain are routed to the parent, which keeps them" if routed else
                    "routing is off, so scans of that domain get the fine-tuned network: check them, or keep the parent"))
    return text


def replay_without_held(replay_names, by_name, held) -> tuple[list[str], list[str]]:
    """``(kept, excluded)``: the replay cases, less those that are the same scan (same
    :func:`~..segment.pipeline.case_hash`) as a held-apart corrected case, so that a held-apart
    case is never trained on through replay (its before/after figures would not be held apart)."""
    names = list(replay_names)
    hashes = {c.case_hash for c in held}
    if not hashes or not names:
        return names, []
    from ..io.images import read_image
    from ..segment.pipeline import case_hash

    excluded = [n for n in names if case_hash(read_image(by_name[n].image)) in hashes]
    return [n for n in names if n not in excluded], excluded
