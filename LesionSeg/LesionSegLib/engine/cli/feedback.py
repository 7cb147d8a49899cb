"""``lesionseg feedback stats|export|import|check``: the review feedback database."""
from __future__ import annotations

import json
import sys

from ..feedback import FeedbackStore, FeedbackStoreError, default_path
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


def _guarded(fn):
    """Run a feedback command; a bad database or file is one line on stderr and exit code 2."""
    def run(args) -> int:
        try:
            return fn(args)
        except (FeedbackStoreError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return run


@_guarded
def _cmd_stats(args) -> int:
    with FeedbackStore(args.db, readonly=True) as store:
        s = store.stats()
        s["corrections"] = cx.stats(store)
    print(json.dumps(s, indent=2) if args.json else format_stats(s) + "\n" + cx.format_stats(s["corrections"]))
    return 0


@_guarded
def _cmd_export(args) -> int:
    from ..feedback.exchange import check_output

    check_output(args.output)  # a bad output name or folder is refused before the database is opened
    with FeedbackStore(args.db, readonly=True) as store:
        n, n_corr, removed = cx.export_all(store, args.output, patches=not args.no_patches,
                                           model_ids=args.model or None)
    print(f"exported {n} decisions to {args.output}")
    if n_corr is not None:
        print(f"exported {n_corr} corrections to {cx.sidecar(args.output)}")
    if removed:
        print(f"removed {cx.sidecar(args.output)}, left by an earlier export (this database holds no corrections)")
    return 0


def format_import(name, c: dict) -> list[str]:
    """What one import did, with the skipped rows by reason and the first row errors."""
    lines = [f"{name}: {c['rows']} rows, {c['inserted']} new, {c['updated']} updated, {c['unchanged']} unchanged, "
             f"{c['skipped']} skipped"]
    if c["skipped"]:
        lines.append("  skipped: " + ", ".join(f"{v} {k}" for k, v in sorted(c["skipped_by_reason"].items())))
        lines += [f"  {e}" for e in c["errors"][:5]]
    return lines


def _importable(f) -> str | None:
    """Why ``f`` cannot be imported (read from its header only), or None."""
    from ..feedback.exchange import check_file

    try:
        if cx.is_corrections_file(f):
            cx.check_file(f)
        else:
            check_file(f)
    except FeedbackStoreError as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot read {f}: {exc.strerror or exc}"
    return None


@_guarded
def _cmd_import(args) -> int:
    problems = {f: _importable(f) for f in args.files}
    for why in problems.values():
        if why:
            print(f"error: {why}; nothing was imported from it", file=sys.stderr)
    good = [f for f in args.files if not problems[f]]
    if not good:  # nothing to import: the database is not opened, nor created
        return 2
    failed = len(args.files) - len(good)
    with FeedbackStore(args.db, on_wait=_waiting) as store:
        total = {"inserted": 0, "updated": 0, "unchanged": 0, "rows": 0, "skipped": 0}
        for f in good:
            try:
                if cx.cli_import(store, f):
                    continue
            except FeedbackStoreError as exc:  # a bad corrections file: its decisions file is still imported
                print(f"error: {exc}", file=sys.stderr)
                failed += 1
                if cx.is_corrections_file(f):
                    continue
            try:
                c = store.import_file(f)
            except FeedbackStoreError as exc:  # the other files are still imported
                print(f"error: {exc}", file=sys.stderr)
                failed += 1
                continue
            print("\n".join(format_import(f, c)))
            for k in total:
                total[k] += c[k]
        print(f"{store.path}: {total['inserted']} new, {total['updated']} updated, {total['skipped']} rows skipped; "
              f"now {store.count()} decisions")
    return 2 if failed else 0


def _waiting(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@_guarded
def _cmd_check(args) -> int:
    with FeedbackStore(args.db, readonly=True, check=True) as store:
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
