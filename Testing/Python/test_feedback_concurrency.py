"""Durability and concurrency of the feedback store, with real processes.

1. A writer killed with SIGKILL in the middle of a batch loses no committed decision and leaves
   a readable, consistent database (and the next writer carries on).
2. Two writer processes on one file (two Slicer sessions) lose nothing, including when both
   change the same lesion.
3. A store being created is never taken for another application's database by a concurrent look.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

from LesionSegLib.engine.feedback import FeedbackStore


REPO = Path(__file__).resolve().parents[2]

WRITER = textwrap.dedent(
    r"""
    import sys, time
    import numpy as np
    from LesionSegLib.engine.feedback import FeedbackStore
    from LesionSegLib.review import Decision

    db, tag, n_batches, batch, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    shared = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    go = sys.argv[7] if len(sys.argv) > 7 else ""
    store = FeedbackStore(db)
    rng = np.random.default_rng(abs(hash(tag)) % 2**32)
    if go:
        import os
        while not os.path.exists(go):
            time.sleep(0.005)

    def decision(i, value, reviewer, case=tag):
        patch = rng.normal(size=(3, 32, 32, 32)).astype(np.float16)
        return Decision(case, "hash-" + case, i, value, 0.5, "m@1", centroid_lps=(float(i) + 1, 2.0, 3.0),
                        features={"f": float(i)}, patch=patch, reviewer=reviewer)

    for b in range(n_batches):
        print(f"BEGIN {b}", flush=True)
        with store.transaction():
            for k in range(batch):
                i = b * batch + k
                store.record(decision(i, "accepted" if i % 2 else "rejected", tag))
                if k == batch // 2:
                    time.sleep(pause)  # a slow batch: the parent kills us here
        print(f"COMMITTED {b}", flush=True)
        if shared:
            # both writers flip the same shared lesion: every flip is a change (other reviewer)
            store.record(decision(10_000, "accepted" if b % 2 else "rejected", tag, case="shared"))
    print("DONE", flush=True)
    """
)


def start_writer(db, tag, n_batches, batch, pause, shared=0, go=""):
    env = dict(os.environ, PYTHONPATH=str(REPO / "LesionSeg") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db), tag, str(n_batches), str(batch), str(pause), str(shared), go],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def test_sigkill_mid_batch_loses_no_committed_decision(tmp_path):
    db = tmp_path / "fb.db"
    batch = 20
    p = start_writer(db, "killed", n_batches=1000, batch=batch, pause=0.3)
    committed = -1
    began_after = False
    deadline = time.time() + 120
    while time.time() < deadline:
        line = p.stdout.readline()
        assert line, f"writer exited early: {p.stderr.read()}"
        word, num = line.split()
        if word == "COMMITTED":
            committed = int(num)
        elif word == "BEGIN" and committed >= 3:
            began_after = True
            break
    assert began_after, "writer too slow"
    time.sleep(0.15)  # inside the batch (it pauses 0.3 s half-way)
    psutil.Process(p.pid).kill()  # SIGKILL on POSIX, TerminateProcess on Windows: no clean-up runs
    p.wait(30)
    assert p.returncode == (-signal.SIGKILL if os.name == "posix" else 1)
    assert (tmp_path / "fb.db-wal").exists()  # the crash left a WAL behind

    store = FeedbackStore(db)  # recovers the WAL
    assert store.verify() == ["ok"]
    n = store.count()
    assert n == (committed + 1) * batch, f"{n} rows after {committed + 1} committed batches of {batch}"
    ids = sorted(r["lesion_id"] for r in store.decisions())
    assert ids == list(range(n))  # every committed decision, nothing of the killed batch
    assert len(store.labelled(with_patches=True)) == n  # the patches decode
    # and the next writer carries on
    p2 = start_writer(db, "after", n_batches=2, batch=5, pause=0.0)
    out, err = p2.communicate(timeout=120)
    assert p2.returncode == 0, err
    assert FeedbackStore(db, readonly=True).count() == n + 10


def test_two_concurrent_writers_lose_nothing(tmp_path):
    db = tmp_path / "fb.db"
    go = tmp_path / "go"
    n_batches, batch = 12, 8
    writers = [start_writer(db, tag, n_batches, batch, 0.01, shared=1, go=str(go)) for tag in ("slicer-1", "slicer-2")]
    time.sleep(1.0)
    go.touch()  # start both at once
    for w in writers:
        out, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
        assert out.strip().endswith("DONE")
    store = FeedbackStore(db, readonly=True)
    assert store.verify() == ["ok"]
    rows = store.decisions()
    for tag in ("slicer-1", "slicer-2"):
        mine = sorted(r["lesion_id"] for r in rows if r["case_name"] == tag)
        assert mine == list(range(n_batches * batch)), tag
    shared = [r for r in rows if r["case_name"] == "shared"]
    assert len(shared) == 1
    hist = store.history("hash-shared", "m@1", (10_001.0, 2.0, 3.0))
    # every change by either session is in the history, revisions 1..n without gaps
    assert [h["revision"] for h in hist] == list(range(1, len(hist) + 1))
    assert shared[0]["revision"] == len(hist)
    by = {t: sum(h["reviewer"] == t for h in hist) for t in ("slicer-1", "slicer-2")}
    assert by["slicer-1"] >= 1 and by["slicer-2"] >= 1
    assert store.count() == 2 * n_batches * batch + 1


def test_a_database_being_created_is_never_called_foreign(tmp_path):
    """3. While one connection creates a brand-new store (tables, application id and version in
    one transaction), another's read-only look at the file sees either an empty file or the whole
    LesionSeg schema, never its tables without its application id (which would refuse it as
    another application's database)."""
    import threading

    from LesionSegLib.engine.feedback.schema import FeedbackStoreError, inspect_file

    verdicts = []
    for i in range(150):
        path = tmp_path / f"new{i}.db"
        maker = threading.Thread(target=lambda: FeedbackStore(path).close())
        maker.start()
        while maker.is_alive():
            try:
                verdicts.append(inspect_file(path)["schema_version"])
            except FeedbackStoreError as exc:
                assert "another application" not in str(exc), exc
                verdicts.append(str(exc))
        maker.join()
        assert inspect_file(path)["schema_version"] > 0
    assert verdicts  # the look did overlap the creation
