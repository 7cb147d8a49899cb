"""``lesionseg models list|activate|rollback|history``: model versions."""
from __future__ import annotations

import json

from ..learn.versions import activate, active_id, history, list_versions, rollback


def format_versions(rows: list[dict]) -> str:
    lines = [f"{'':2s}{'model':28s} {'parent':24s} {'created':26s} metrics"]
    for r in rows:
        m = r["metrics"]
        figs = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in list(m.items())[:4])
        mark = "* " if r["active"] else "  "
        lines.append(f"{mark}{r['id']:28s} {str(r['parent'] or '-'):24s} {r['created'] or ('builtin' if r['builtin'] else '-'):26s} {figs}")
    return "\n".join(lines)


def _cmd_list(args) -> int:
    rows = list_versions(args.name)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_versions(rows) if rows else "no models found")
        print(f"active: {active_id()}")
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
