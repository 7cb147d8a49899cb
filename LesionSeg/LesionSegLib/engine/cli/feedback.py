"""``lesionseg feedback stats|export|import|check``: the review feedback database."""
from __future__ import annotations

import json

from ..feedback import FeedbackStore, default_path
from ..feedback import corrections_exchange as cx


def format_stats(s: dict) -> str:
    lines = [
        f"feedback database {s['path']} (schema {s['schema_version']})",
        f"  {s['decisions']} decisions on {s['cases']} cases by {s['reviewers']} reviewer(s); "
        f"{s['changes']} changed decisions; {s['with_patch']} with patches; last {s['last_decision'] or '-'}",
        f"  {'model':32s} {'accepted':>9s} {'rejected':>9s} {'unsure':>7s}",
    ]
    for m, c in sorted(s["by_model"].items()):
        lines.append(f"  {m:32s} {c['accepted']:9d} {c['rejected']:9d} {c['unsure']:7d}")
    t = s["by_class"]
    lines.append(f"  {'total':32s} {t['accepted']:9d} {t['rejected']:9d} {t['unsure']:7d}")
    return "\n".join(lines)


def _cmd_stats(args) -> int:
    with FeedbackStore(args.db, readonly=True) as store:
        s = store.stats()
        s["corrections"] = cx.stats(store)
    print(json.dumps(s, indent=2) if args.json else format_stats(s) + "\n" + cx.format_stats(s["corrections"]))
    return 0


def _cmd_export(args) -> int:
    with FeedbackStore(args.db, readonly=True) as store:
        n = store.export(args.output, patches=not args.no_patches, model_ids=args.model or None)
    print(f"exported {n} decisions to {args.output}")
    cx.cli_export(args.db, args.output)
    return 0


def _cmd_import(args) -> int:
    with FeedbackStore(args.db) as store:
        total = {"inserted": 0, "updated": 0, "unchanged": 0, "rows": 0}
        for f in args.files:
            if cx.cli_import(store, f):
                continue
            c = store.import_file(f)
            print(f"{f}: {c['rows']} rows, {c['inserted']} new, {c['updated']} updated, {c['unchanged']} unchanged")
            for k in total:
                total[k] += c[k]
        print(f"{store.path}: {total['inserted']} new, {total['updated']} updated; now {store.count()} decisions")
    return 0


def _cmd_check(args) -> int:
    with FeedbackStore(args.db, readonly=True) as store:
        res = store.verify()
    print(f"{args.db}: integrity {'; '.join(res)}")
    return 0 if res == ["ok"] else 1


def register(subparsers) -> None:
    """``lesionseg feedback stats|export|import|check``."""
    p = subparsers.add_parser("feedback", help="the review feedback database: stats, export, import")
    sub = p.add_subparsers(dest="feedback_cmd", required=True)

    def db_arg(q):
        q.add_argument("--db", default=str(default_path()), help="feedback database (default: %(default)s)")

    q = sub.add_parser("stats", help="decisions per model and class")
    db_arg(q)
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=_cmd_stats)
    q = sub.add_parser("export", help="write the decisions to .csv or .parquet (for sharing)")
    db_arg(q)
    q.add_argument("output", help="output .csv or .parquet file")
    q.add_argument("--no-patches", action="store_true", help="leave out the image patches (features only)")
    q.add_argument("--model", action="append", help="only decisions made with this model id (repeatable)")
    q.set_defaults(func=_cmd_export)
    q = sub.add_parser("import", help="merge exported .csv/.parquet files (newer decisions win)")
    db_arg(q)
    q.add_argument("files", nargs="+")
    q.set_defaults(func=_cmd_import)
    q = sub.add_parser("check", help="full integrity check of the database")
    db_arg(q)
    q.set_defaults(func=_cmd_check)
