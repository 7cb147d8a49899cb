"""Corrections in the feedback store: schema migration with a backup, round trip on the model
grid, limits, export/import with validation, the CLI, SIGKILL safety and two writers."""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import psutil
import pytest
import SimpleITK as sitk

from LesionSegLib.engine import feedback as fb
from LesionSegLib.engine.cli import main as cli_main
from LesionSegLib.engine.feedback import FeedbackStore, FeedbackStoreError
from LesionSegLib.engine.feedback import corrections as cr
from LesionSegLib.engine.feedback import corrections_exchange as cx
from LesionSegLib.engine.feedback import schema as fb_schema
from LesionSegLib.engine.feedback.grid import grid_image, mask_to_model_grid, model_grid

REPO = Path(__file__).resolve().parents[2]
SPACING = (3.0, 2.0, 2.0)


def synthetic_ct(seed: int = 0) -> tuple[sitk.Image, np.ndarray]:
    """A CT-like volume in HU (a body ellipse with two dense spheres) and its 0/1 lesion label."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:30, :64, :60]
    hu = np.full((30, 64, 60), -1000.0)
    body = ((y - 32) / 28.0) ** 2 + ((x - 30) / 26.0) ** 2 < 1
    hu[body] = 40 + rng.normal(0, 10, body.sum())
    lab = np.zeros(hu.shape, np.uint8)
    for cz, cy, cx_, r in ((10, 25, 22, 5), (20, 40, 38, 4)):
        s = ((z - cz) * 1.5) ** 2 + (y - cy) ** 2 + (x - cx_) ** 2 < r**2
        hu[s] = 120
        lab[s] = 1
    img = sitk.GetImageFromArray(hu.astype(np.int16))
    img.SetSpacing((1.5, 1.5, 3.0))
    img.SetOrigin((-40.0 - seed, 12.0, 100.0))
    return img, lab


def case_hash(img) -> str:
    return hashlib.sha256(sitk.GetArrayViewFromImage(img).tobytes() + repr(img.GetOrigin()).encode()).hexdigest()


def corrections_for(img, lab):
    """A reviewed case: lesion 1 edited (grown), lesion 2 added (missed), a false positive deleted."""
    grid = model_grid(img, SPACING)
    from LesionSegLib.engine.evaluate.matching import gt_components

    comps, _ = gt_components(lab)
    edited = mask_to_model_grid(comps == 1, img, grid)
    added = mask_to_model_grid(comps == 2, img, grid)
    fp = np.zeros(grid.shape, bool)
    fp[2:5, 3:8, 3:9] = True
    out = [cr.Correction("edited", edited, "c:1.0,2.0,3.0", 1, 0.8), cr.Correction("added", added),
           cr.Correction("deleted", fp, "c:9.0,9.0,9.0", 2, 0.6)]
    return grid, out


def save(store, seed=0, model="m@1"):
    img, lab = synthetic_ct(seed)
    grid, corr = corrections_for(img, lab)
    h = case_hash(img)
    return h, grid, corr, cr.save_case(store, h, f"case{seed}", model, grid, corr, reviewer="dr")


def test_model_grid_matches_the_engine_preprocessing():
    img, lab = synthetic_ct()
    grid = model_grid(img, SPACING)
    assert grid.hu.dtype == np.int16 and grid.geometry["spacing_zyx"] == pytest.approx(SPACING, rel=0.1)
    m = mask_to_model_grid(lab, img, grid)
    assert m.shape == grid.shape and m.any()
    # the lesion keeps its HU on the grid and lies where the label is, in physical space
    assert np.median(grid.hu[m]) > 100
    g = grid_image(grid.hu, grid.geometry)
    centre = g.TransformContinuousIndexToPhysicalPoint(np.argwhere(m).mean(0)[::-1].tolist())
    want = img.TransformContinuousIndexToPhysicalPoint(np.argwhere(lab > 0).mean(0)[::-1].tolist())
    assert np.allclose(centre, want, atol=3.0)


def test_round_trip_and_replace_on_second_save(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    h, grid, corr, counts = save(store)
    assert counts == {"edited": 1, "added": 1, "deleted": 1, "kept": 0}
    [case] = cr.load_cases(store)
    assert case.case_hash == h and case.model_ids == ["m@1"]
    np.testing.assert_array_equal(case.hu, grid.hu)  # lossless int16
    np.testing.assert_array_equal(case.label > 0, corr[0].mask | corr[1].mask)
    np.testing.assert_array_equal(case.rejected, corr[2].mask)
    s = cr.stats(store)
    assert s["cases"] == 1 and s["edited"] == 1 and s["added"] == 1 and s["deleted"] == 1
    assert s["image_bytes"] < grid.hu.nbytes / 2  # compressed
    # saving the case again replaces its corrections (the reviewer removed the added segment)
    cr.save_case(store, h, "case0", "m@1", grid, [corr[0], corr[2]])
    assert cr.stats(store)["added"] == 0 and cr.stats(store)["cases"] == 1


def test_limits_and_bad_records_are_refused(tmp_path, monkeypatch):
    store = FeedbackStore(tmp_path / "fb.db")
    img, lab = synthetic_ct()
    grid, corr = corrections_for(img, lab)
    h = case_hash(img)
    with pytest.raises(FeedbackStoreError, match="invalid case hash"):
        cr.save_case(store, "xyz", "c", "m@1", grid, corr)
    with pytest.raises(FeedbackStoreError, match="kind"):
        cr.save_case(store, h, "c", "m@1", grid, [cr.Correction("moved", corr[0].mask, "k")])
    with pytest.raises(FeedbackStoreError, match="needs the key"):
        cr.save_case(store, h, "c", "m@1", grid, [cr.Correction("edited", corr[0].mask)])
    with pytest.raises(FeedbackStoreError, match="empty mask"):
        cr.save_case(store, h, "c", "m@1", grid, [cr.Correction("added", np.zeros(grid.shape, bool))])
    monkeypatch.setattr(cr, "MAX_PER_CASE", 2)
    with pytest.raises(FeedbackStoreError, match="limit of 2"):
        cr.save_case(store, h, "c", "m@1", grid, corr)
    monkeypatch.setattr(cr, "MAX_MASK_VOXELS", 10)
    with pytest.raises(FeedbackStoreError, match="over the limit of 10 voxels"):
        cr.save_case(store, h, "c", "m@1", grid, corr[:1])
    monkeypatch.setattr(cr, "MAX_IMAGE_VOXELS", 1000)
    with pytest.raises(FeedbackStoreError, match="limit of 1000 voxels"):
        cr.save_case(store, h, "c", "m@1", grid, [])
    assert cr.stats(store)["cases"] == 0  # nothing half-written


def test_migration_from_schema_2_with_backup(tmp_path):
    path = tmp_path / "old.db"
    con = sqlite3.connect(path, isolation_level=None)
    fb_schema._migrate(con, target=2)  # a database as the current release writes it
    con.execute("INSERT INTO decisions (uid, case_hash, case_name, model_id, lesion_key, lesion_id, decision, "
                "confidence, reviewer, decided_at, created_at, updated_at) VALUES "
                "('u1', 'h', 'case', 'm@1', 'id:1', 1, 'rejected', 0.7, 'r', 't0', 't0', 't0')")
    con.close()
    assert fb.inspect_file(path)["schema_version"] == 2
    store = FeedbackStore(path)
    assert store.schema_version == fb.SCHEMA_VERSION >= 3
    backup = tmp_path / "old.db.schema2.bak"
    assert backup.exists() and fb.inspect_file(backup)["schema_version"] == 2
    assert store.count() == 1 and store.decisions()[0]["decision"] == "rejected"
    save(store)
    assert cr.stats(store)["cases"] == 1


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_import_round_trip_via_cli(tmp_path, fmt, capsys):
    src = FeedbackStore(tmp_path / "a.db")
    h, grid, corr, _ = save(src)
    save(src, seed=1)
    src.close()
    out = tmp_path / f"share.{fmt}"
    assert cli_main(["feedback", "export", "--db", str(tmp_path / "a.db"), str(out)]) == 0
    assert cx.sidecar(out).exists()
    assert cli_main(["feedback", "import", "--db", str(tmp_path / "b.db"), str(out)]) == 0
    assert "6 corrections, 6 new" in capsys.readouterr().out
    dst = FeedbackStore(tmp_path / "b.db")
    cases = {c.case_hash: c for c in cr.load_cases(dst)}
    assert len(cases) == 2
    np.testing.assert_array_equal(cases[h].hu, grid.hu)
    np.testing.assert_array_equal(cases[h].label > 0, corr[0].mask | corr[1].mask)
    # importing again changes nothing (same timestamps)
    c = cx.import_file(dst, cx.sidecar(out))
    assert c["inserted"] == 0 and c["unchanged"] == 6 and c["images"] == 0
    assert cli_main(["feedback", "stats", "--db", str(tmp_path / "b.db"), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["corrections"]["cases"] == 2 and stats["corrections"]["deleted"] == 2


def test_import_validates_every_row(tmp_path):
    src = FeedbackStore(tmp_path / "a.db")
    save(src)
    out = tmp_path / "x.corrections.csv"
    cx.export(src, out)
    text = out.read_text(encoding="utf-8").splitlines()
    header = text[0].split(",")
    dst = FeedbackStore(tmp_path / "b.db")

    def mutate(fn, name):
        import csv

        rows = list(csv.DictReader(open(out)))
        fn(rows)
        p = tmp_path / f"{name}.corrections.csv"
        with open(p, "w", newline="") as fh:
            w = csv.DictWriter(fh, header)
            w.writeheader()
            w.writerows(rows)
        return p

    def box_outside(rows):
        r = next(r for r in rows if r["record"] == "correction")
        r["bbox"] = json.dumps([[0, 0, 0], [999, 5, 5]])

    def wrong_count(rows):
        r = next(r for r in rows if r["record"] == "correction")
        r["n_voxels"] = str(int(r["n_voxels"]) + 1)

    def bad_kind(rows):
        next(r for r in rows if r["record"] == "correction")["kind"] = "moved"

    def no_image(rows):
        rows[:] = [r for r in rows if r["record"] == "correction"]

    def corrupt_image(rows):
        next(r for r in rows if r["record"] == "image")["blob"] = "AAAA"

    for fn, msg in ((box_outside, "outside its image"), (wrong_count, "record says"), (bad_kind, "kind"),
                    (no_image, "no image for case"), (corrupt_image, "corrupt correction image")):
        with pytest.raises(FeedbackStoreError, match=msg):
            cx.import_file(dst, mutate(fn, fn.__name__))
    assert cr.stats(dst) == {**{k: 0 for k in cr.KINDS}, "cases": 0, "image_bytes": 0, "mask_bytes": 0}
    assert cx.import_file(dst, out)["inserted"] == 3


WRITER = textwrap.dedent(
    r"""
    import sys, time
    sys.path.insert(0, sys.argv[4])
    from test_corrections import synthetic_ct, corrections_for, case_hash
    from LesionSegLib.engine.feedback import FeedbackStore
    from LesionSegLib.engine.feedback import corrections as cr

    db, first, n, hang = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[5] == "hang"
    store = FeedbackStore(db)
    for seed in range(first, first + n):
        img, lab = synthetic_ct(seed)
        grid, corr = corrections_for(img, lab)
        with store.transaction():
            cr.save_case(store, case_hash(img), f"case{seed}", "m@1", grid, corr)
            if hang and seed == first + n - 1:
                print("HANGING", flush=True)
                time.sleep(60)
        print(f"COMMITTED {seed}", flush=True)
    print("DONE", flush=True)
    """
)


def _writer(db, first, n, mode="run"):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "LesionSeg"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(first), str(n), str(Path(__file__).parent), mode],
                            stdout=subprocess.PIPE, text=True, env=env)


def test_sigkill_and_two_writers(tmp_path):
    db = tmp_path / "fb.db"
    FeedbackStore(db).close()
    killed = _writer(db, 0, 3, "hang")
    other = _writer(db, 10, 3)
    for line in killed.stdout:
        if line.startswith("HANGING"):
            break
    psutil.Process(killed.pid).kill()  # SIGKILL on POSIX, TerminateProcess on Windows
    killed.wait()
    assert other.wait(timeout=300) == 0
    store = FeedbackStore(db)
    assert store.verify() == ["ok"]
    names = sorted(c.case_name for c in cr.load_cases(store))
    assert names == ["case0", "case1", "case10", "case11", "case12"]  # case2 was never committed
    assert cr.stats(store)["edited"] == 5
