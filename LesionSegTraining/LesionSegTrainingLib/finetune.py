"""The LesionSegTraining "Fine-tune segmenter" entry point (MRML, no Qt).

    job = start_finetune(logic, base_model="sts-clcs", steps=150)   # background process
    ...poll job.fraction / job.status / job.state, job.cancel()...
    result, table = finish_finetune(logic, job)                    # before/after table node

``logic`` is the module's :class:`~LesionSegTrainingLib.logic.TrainingLogicCore` with an open
feedback database (the one the LesionSeg module saves corrections into).
"""
from __future__ import annotations

FINETUNE_TABLE = "LesionSeg fine-tuning metrics"


def correction_counts(logic) -> dict:
    """Corrections per kind and corrected cases in the open database (for the panel)."""
    from LesionSegLib.engine.feedback.corrections import stats

    if logic.store is None:
        raise RuntimeError("open a feedback database first")
    return stats(logic.store)


def corrections_text(counts: dict) -> str:
    """One line for the panel: corrected cases and corrections per kind (from :func:`correction_counts`)."""
    from LesionSegLib.engine.learn.finetune import MIN_CASES

    return (f"{counts['cases']} corrected case(s): {counts['edited']} edited, {counts['added']} added, {counts['deleted']} "
            f"deleted, {counts['kept']} kept segment(s). Fine-tuning needs at least {MIN_CASES} cases with an edited, "
            "added or deleted segment.")


def result_text(res: dict) -> str:
    """One line for the panel after a finished fine-tuning (held-apart Dice before -> after when there
    is one), the base-domain check's warning when the new network forgets the parent's domain, and
    the routing's when this version no longer sends the scans of a domain to the model kept for it."""
    from LesionSegLib.engine.learn.finetune_checks import FORGETTING_WARN

    m = res.get("metrics", {})
    before, after = m.get("held_apart_dice_before"), m.get("held_apart_dice_after")
    held = (f"held-apart Dice {before:.3f} -> {after:.3f}" if before is not None and after is not None
            else "no corrected case held apart for before/after figures")
    text = f"New version {res['model']} in {res.get('seconds', 0):.0f} s; {held}. Press Activate to use it."
    b, a = m.get("base_domain_dice_before"), m.get("base_domain_dice_after")
    if b is not None and a is not None and b - a > FORGETTING_WARN:
        text += (f" Its segmenter forgets part of the parent's own domain (Dice on the parent's training cases "
                 f"{b:.3f} -> {a:.3f}); see the card's routing.")
    gives_up = (res.get("routing") or {}).get("gives_up")
    if gives_up:
        text += f" Warning: {gives_up}."
    return text


def start_finetune(logic, base_model: str | None = None, output: str | None = None, steps: int | None = None,
                   minutes: float | None = None, replay_cases: str | None = None, synthetic: float = 0.0, lung_negatives: float | None = None,
                   extra=(), **kw):
    """Start ``lesionseg finetune`` on the open database in a background process (``replay_cases``:
    ``--replay-cases``, comma-separated case names or "none"; blank: the base training split;
    ``synthetic``: ``--synthetic-lesions``; ``lung_negatives``: ``--lung-negatives``, None for the command's default)."""
    from LesionSegLib.engine.learn.finetune_job import FinetuneJob

    if logic.store is None:
        raise RuntimeError("open a feedback database first")
    if replay_cases and replay_cases.strip():
        extra = ["--replay-cases", replay_cases.strip(), *extra]
    if synthetic and float(synthetic) > 0:
        extra = ["--synthetic-lesions", f"{float(synthetic):g}", *extra]
    if lung_negatives is not None:
        extra = ["--lung-negatives", f"{float(lung_negatives):g}", *extra]
    return FinetuneJob(str(logic.database_path), base_model or None, output or None, steps, minutes, extra=extra, **kw).start()


def finish_finetune(logic, job):
    """After a finished job: a table node with the before/after figures on the held-apart corrected
    cases; the versions table is refreshed.  Returns ``(result dict, table node)``."""
    from .logic import PARAM_LAST_MODEL, fill_table

    state = job.state
    if state != "finished":
        raise RuntimeError(f"fine-tuning {state}: {job.error or job.status}")
    res = job.result
    m = res.get("metrics", {})
    rows = [[label, m.get(f"held_apart_{key}_before"), m.get(f"held_apart_{key}_after")]
            for label, key in (("Sensitivity", "sensitivity"), ("FP per case", "fp_per_case"), ("Dice", "dice"))]
    if m.get("base_domain_dice_before") is not None:  # forgetting: the parent's own (replayed) training cases
        rows.append(["Parent's own cases: segmenter Dice", m["base_domain_dice_before"], m["base_domain_dice_after"]])
    table = logic._table("finetune", FINETUNE_TABLE)
    fill_table(table, ["Held-apart corrected cases", "Before", "After"], rows)
    table.SetAttribute("LesionSegTraining.Model", res["model"])
    logic._set_param(PARAM_LAST_MODEL, res["model"])
    logic.update_versions_table()
    return res, table
