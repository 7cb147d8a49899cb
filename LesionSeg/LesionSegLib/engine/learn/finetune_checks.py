"""Checks around a segmenter fine-tuning (used by :mod:`.finetune`): what the new network forgot
of its parent's domain, keeping held-apart corrected cases out of the replay, and whether the new
version routes the scans of its parent's domain (or its parent's own routing target) there."""
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
                 + ("scans of that domain are routed to the model they came from, which keeps them" if routed else
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


def _installed_twin(kept):
    """The installed model of ``kept``'s id with the same segmenter and classifier bytes and usable
    OOD statistics (an Engine), or None: a kept copy whose statistics are of an older scan
    descriptor still routes through the installed model it is a copy of."""
    from .. import models
    from ..errors import LesionSegError
    from ..segment.pipeline import Engine

    try:
        card = models.get_card(kept.card.id)
        same = all(card.part(k).get("sha256") == kept.card.part(k).get("sha256") for k in ("segmenter", "classifier"))
        twin = Engine(card, device="cpu", runtime="torch") if same else None
    except (LesionSegError, KeyError):
        return None
    return twin if twin is not None and twin.ood is not None else None


def route_target(base):
    """The model that a version fine-tuned from ``base`` sends the scans of its domain to, when it
    routes: ``base`` itself, or, when ``base`` already routes (a fine-tuned model that keeps a copy
    of its own parent), the model at the end of that chain (a kept copy written before routing
    was carried over may itself keep one).  The kept model's OOD reference holds its training
    domain alone, while ``base``'s also holds the cases it was fine-tuned on: judged against
    ``base``, a second round of corrections from the same new domain lies inside it, and routing
    was given up.  A kept copy without usable OOD statistics (an older scan descriptor) is
    replaced by the installed model it is a copy of, when that one has them."""
    target = base
    while getattr(target, "in_domain", None) is not None:
        kept = target.in_domain
        if getattr(kept, "ood", None) is None:
            kept = _installed_twin(kept)
            if kept is None:
                break
        target = kept
    return target


def routing_decision(base, train, wanted: bool | None, target=None) -> dict:
    """The card's ``routing`` section of a version fine-tuned from ``base`` on the corrected cases
    ``train``: whether it routes the scans of :func:`route_target`'s domain to that model.  When
    ``wanted`` is None, yes exactly when every training corrected case lies outside that domain
    (its scan OOD score under the target is above the target's scan threshold), i.e. the
    fine-tuning adapts the model to a new domain.  Corrections from the target's own domain train
    the model for that domain, so they never route.  A target without usable OOD statistics
    cannot route (``wanted`` True is then refused with a ValueError naming the fix).  ``target``:
    :func:`route_target` of ``base``, when already found."""
    from ..feedback.grid import grid_image
    from .ood_fit import descriptor_of

    target = route_target(base) if target is None else target
    kept = getattr(base, "in_domain", None)
    if target.ood is None:
        if wanted:
            raise ValueError(f"routing cannot be turned on: {target.card.id} has no usable OOD statistics, so its domain "
                             f"cannot be told (refit them: lesionseg fit-ood --model {target.card.folder})")
        out = {"enabled": False, "why": f"{target.card.id} has no usable OOD statistics, so its domain cannot be told"}
        if kept is not None:
            out["gives_up"] = (f"{base.card.id} kept a copy of {kept.card.id} for scans of its domain, which cannot be told "
                               f"without usable OOD statistics: those scans run this version's fine-tuned networks")
        return out
    scores = {c.case_name: round(target.ood.scan_score(descriptor_of(grid_image(c.hu, c.geometry))), 3) for c in train}
    outside = all(v > target.ood.scan_threshold for v in scores.values())
    enabled = outside if wanted is None else bool(wanted)
    rule = (f"a scan whose OOD score under {target.card.id} is <= {target.ood.scan_threshold:g} (inside its domain: "
            f"{target.ood.domain or 'its training data'}) is segmented by {target.card.id}'s own segmenter and classifier; "
            "every other scan by this model's fine-tuned ones")
    where = "the parent's domain" if target is base else f"the domain of {target.card.id}, which {base.card.id} routes to"
    why = (f"every corrected training case lies outside {where}" if outside else
           f"some corrected training cases lie inside {where}") + (
           "" if wanted is None else f"; routing {'forced on' if wanted else 'turned off'} by the caller")
    out = {"enabled": enabled, "parent": target.card.id, "rule": rule if enabled else None, "why": why,
           "train_case_scan_ood": scores, "scan_threshold": target.ood.scan_threshold}
    if target is not base:
        out["via"] = base.card.id  # the routing is the parent's own, carried over (its kept copy is copied)
    if kept is not None and not enabled:  # the parent routed its own parent's domain: said, since this one does not
        inside = sorted(n for n, v in scores.items() if v <= target.ood.scan_threshold)
        how = ("routing was turned off" if wanted is False else
               f"the corrected cases {', '.join(inside)} lie inside that domain; to keep the routing, fine-tune without "
               f"them, or with --routing on (scans of that domain then get {target.card.id}'s answers, not what those "
               "corrections taught)")
        out["gives_up"] = (f"{base.card.id} sent the scans of {target.card.id}'s domain ({target.ood.domain or '?'}) "
                           f"to {target.card.id}; this version does not, so those scans run its fine-tuned networks ({how})")
    return out
