"""``lesionseg models list|activate|rollback|history|export``: model versions and their ONNX exports."""
from __future__ import annotations

import json
import sys

from ..learn.versions import activate, active_id, active_state_problem, history, list_versions, rollback


def format_versions(rows: list[dict]) -> str:
    lines = [f"{'':2s}{'model':28s} {'parent':24s} {'created':26s} metrics"]
    for r in rows:
        m = r["metrics"]
        figs = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={str(v)[:40]}" for k, v in list(m.items())[:4])
        mark = "* " if r["active"] else "  "
        lines.append(f"{mark}{r['id']:28s} {str(r['parent'] or '-'):24s} {r['created'] or ('builtin' if r['builtin'] else '-'):26s} {figs}")
    return "\n".join(lines)


def _cmd_list(args) -> int:
    from ..models import user_models_problem

    problems: list[str] = []
    rows = list_versions(args.name, problems)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_versions(rows) if rows else "no models found")
        print(f"active: {active_id()}")
    for note in [active_state_problem(), user_models_problem(), *problems]:
        if note:
            print(f"note: {note}", file=sys.stderr)
    return 0


def _cmd_activate(args) -> int:
    print(f"active model: {activate(args.model)}")
    return 0


def _cmd_rollback(args) -> int:
    print(f"rolled back; active model: {rollback()}")
    return 0


def _cmd_history(args) -> int:
    for e in history():
        print(f"{e.get('at', '')}  {e.get('event', ''):9s} {e.get('previous', '')} -> {e.get('id', '')}")
    return 0


def _cmd_export(args) -> int:
    """Export (or verify the cached exports of) every network of a model that runs on an ONNX
    runtime; print each file with its sha256, and with ``--write-card`` record them in the card."""
    import sys

    from ..errors import LesionSegError

    from .common import one_line

    try:
        return _export(args)
    except (LesionSegError, OSError) as exc:  # one line, never a traceback
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2


def _export(args) -> int:
    from ..errors import InputError
    from ..models import get_card
    from ..runtime.export import CACHE_DIR, card_record, export_paths
    from ..segment.pipeline import load_engine

    if args.runtime == "torch":
        raise InputError("the torch runtime runs no ONNX export; use --runtime auto, openvino or onnxruntime")
    card = get_card(args.model)
    engine = load_engine(card, device="cpu", runtime=args.runtime)
    if engine.runtime == "torch":
        raise InputError("neither openvino nor onnxruntime can be imported, so nothing was exported")
    getattr(engine, "click_runner", None)  # a card's click segmenter is exported on first use: now
    # the networks this engine exported (or found cached): weights with a sha256 and an export
    parts = [k for k, v in card.data.items() if isinstance(v, dict) and v.get("sha256") and export_paths(card, k)[1].exists()]
    record = card_record(card, parts)
    for part, r in record.items():
        print(f"{part:14s} {export_paths(card, part)[0]}  sha256 {r['sha256']}  (torch {r['torch']}, opset {r['opset']})")
    for note in dict.fromkeys(engine.messages):
        print(f"note: {note}")
    if args.write_card:
        card.data["onnx"] = record
        print(f"wrote the onnx section of {card.save()} ({CACHE_DIR} files are made again on any machine from the weights)")
    return 0


def register(subparsers) -> None:
    """``lesionseg models list|activate|rollback|history``."""
    p = subparsers.add_parser("models", help="model versions: list, activate, roll back")
    sub = p.add_subparsers(dest="models_cmd", required=True)
    q = sub.add_parser("list", help="list model versions (* = active)")
    q.add_argument("name", nargs="?", help="only this model name")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_cmd_list)
    q = sub.add_parser("activate", help="make a model version the default (checksums verified)")
    q.add_argument("model", help="name@version (or name: its newest version)")
    q.set_defaults(func=_cmd_activate)
    q = sub.add_parser("rollback", help="re-activate the previously active version")
    q.set_defaults(func=_cmd_rollback)
    q = sub.add_parser("history", help="activation log")
    q.set_defaults(func=_cmd_history)
    q = sub.add_parser("export", help="export a model's networks to ONNX (cached, checksummed); print or record them in the card")
    q.add_argument("model", help="model name, name@version or folder")
    q.add_argument("--runtime", default="auto", help="auto (default), openvino or onnxruntime")
    q.add_argument("--write-card", action="store_true", help="record each export's file and sha256 in the model's card.json")
    q.set_defaults(func=_cmd_export)
