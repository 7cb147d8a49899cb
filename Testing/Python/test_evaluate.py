"""``lesionseg evaluate``: metrics on hand-made cases with known answers, layouts, errors, one real case."""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LesionSegLib.engine import evaluate as ev
from LesionSegLib.engine.cli import evaluate as ev_cli
from LesionSegLib.engine.evaluate import report as report_mod
from LesionSegLib.engine.errors import InputError
from LesionSegLib.engine.segment.result import CSV_COLUMNS

SHAPE = (12, 20, 20)  # z, y, x


# ------------------------------------------------------------------------------ helpers
def _write_volume(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path), useCompression=True)


def write_pred(outdir: Path, stem: str, labelmap: np.ndarray, conf, mean_prob=None, **geo) -> None:
    """What ``lesionseg segment`` writes: ``<stem>_lesions.nii.gz`` and ``<stem>_lesions.csv``."""
    mean_prob = conf if mean_prob is None else mean_prob
    _write_volume(labelmap.astype(np.uint16), outdir / f"{stem}_lesions.nii.gz", **geo)
    with open(outdir / f"{stem}_lesions.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for k, (c, mp) in enumerate(zip(conf, mean_prob), start=1):
            row = {col: 0 for col in CSV_COLUMNS}
            row.update(lesion_id=k, confidence=c, mean_probability=mp, n_voxels=int(np.count_nonzero(labelmap == k)))
            w.writerow(row)


def write_gt(gtdir: Path, case: str, label: np.ndarray, **geo) -> None:
    _write_volume((label > 0).astype(np.uint8), gtdir / case / "label.nii.gz", **geo)


def box(arr: np.ndarray, value: int, z, y, x) -> None:
    arr[z[0] : z[1], y[0] : y[1], x[0] : x[1]] = value


def blank() -> np.ndarray:
    return np.zeros(SHAPE, dtype=np.uint16)


def run_eval(tmp_path: Path, **kw) -> dict:
    return ev.evaluate(tmp_path / "pred", tmp_path / "gt", **kw)


# ------------------------------------------------------------------------------ known answers
def test_perfect_prediction(tmp_path):
    for case in ("A", "B"):
        lab = blank()
        box(lab, 1, (1, 4), (2, 6), (2, 6))
        box(lab, 2, (6, 10), (10, 16), (10, 16))
        write_gt(tmp_path / "gt", case, lab)
        write_pred(tmp_path / "pred", case, lab, [0.95, 0.95])
    rep = run_eval(tmp_path)
    s = rep["summary"]
    assert s["n_cases"] == 2 and s["n_gt_lesions"] == 4 and s["n_clusters"] == 4
    assert s["dice_mean"] == pytest.approx(1.0) and s["dice_global"] == pytest.approx(1.0)
    fr = rep["detection"]["froc"]["confidence"]
    assert fr["sensitivity"] == pytest.approx([1.0] * 7)
    assert s["cpm"] == pytest.approx(1.0) and s["sensitivity_at_0.5fp"] == pytest.approx(1.0)
    assert s["fp_per_case"] == 0 and rep["detection"]["n_detected"] == 4
    assert s["cluster_auc"] is None  # no FP cluster: AUC undefined, and said so
    assert any("AUC is undefined" in n for n in rep["notes"])
    assert s["ece"] == pytest.approx(0.05, abs=1e-6)  # 4 clusters at 0.95, all true positives


def test_one_false_positive(tmp_path):
    gt = blank()
    box(gt, 1, (2, 5), (2, 5), (2, 5))  # 27 voxels
    pred = gt.copy()
    box(pred, 2, (8, 10), (14, 16), (14, 16))  # 8 voxels, far away
    write_gt(tmp_path / "gt", "C1", gt)
    write_pred(tmp_path / "pred", "C1", pred, conf=[0.95, 0.65], mean_prob=[0.55, 0.75])
    rep = run_eval(tmp_path)
    s = rep["summary"]
    assert s["dice_mean"] == pytest.approx(2 * 27 / (27 + 35))
    assert s["dice_global"] == pytest.approx(2 * 27 / (27 + 35))
    assert rep["detection"]["n_fp_clusters"] == 1 and s["fp_per_case"] == 1.0
    # ranked by confidence the lesion comes first: sensitivity 1 at any FP rate
    assert rep["detection"]["froc"]["confidence"]["sensitivity"] == pytest.approx([1.0] * 7)
    # ranked by mean probability the FP comes first: 0 below 1 FP/case, 1 from 1 FP/case on
    mp = rep["detection"]["froc"]["mean_probability"]["sensitivity"]
    assert mp == pytest.approx([0, 0, 0, 1, 1, 1, 1])
    assert s["cpm_mean_probability"] == pytest.approx(4 / 7)
    assert s["cluster_auc"] == pytest.approx(1.0) and s["cluster_auc_mean_probability"] == pytest.approx(0.0)
    # one TP at 0.95 (error 0.05) and one FP at 0.65 (error 0.65), equal weight
    assert s["ece"] == pytest.approx(0.35, abs=1e-6)
    assert s["ece_mean_probability"] == pytest.approx((0.45 + 0.75) / 2, abs=1e-6)
    roles = {c["lesion_id"]: c["role"] for c in rep["cases"][0]["clusters"]}
    assert roles == {1: "detection", 2: "fp"}


def test_missed_lesion(tmp_path):
    gt = blank()
    box(gt, 1, (1, 4), (1, 5), (1, 5))  # 48 voxels, found
    box(gt, 1, (7, 11), (12, 18), (12, 18))  # 144 voxels, missed
    pred = blank()
    box(pred, 1, (1, 4), (1, 5), (1, 5))
    write_gt(tmp_path / "gt", "M", gt)
    write_pred(tmp_path / "pred", "M", pred, [0.85])
    rep = run_eval(tmp_path)
    s = rep["summary"]
    assert s["n_gt_lesions"] == 2 and rep["detection"]["n_detected"] == 1
    assert rep["detection"]["froc"]["confidence"]["sensitivity"] == pytest.approx([0.5] * 7)
    assert s["cpm"] == pytest.approx(0.5) and s["max_sensitivity"] == pytest.approx(0.5)
    assert s["dice_mean"] == pytest.approx(2 * 48 / (48 + 192))
    assert rep["cases"][0]["gt_lesion_voxels"] == [48, 144]


def test_duplicate_hits_are_neither_detections_nor_false_positives(tmp_path):
    gt = blank()
    box(gt, 1, (0, 10), (0, 10), (0, 10))  # one big lesion, 1000 voxels
    pred = blank()
    box(pred, 1, (0, 4), (0, 4), (0, 4))  # fragment inside it: 64 voxels, IoU 0.064 but 100 % inside
    box(pred, 2, (6, 9), (6, 9), (6, 9))  # another fragment inside it
    box(pred, 3, (2, 4), (15, 18), (15, 18))  # a false positive
    write_gt(tmp_path / "gt", "D", gt)
    write_pred(tmp_path / "pred", "D", pred, conf=[0.95, 0.75, 0.85])
    rep = run_eval(tmp_path)
    d = rep["detection"]
    assert (d["n_detected"], d["n_duplicates"], d["n_fp_clusters"], d["n_tp_clusters"]) == (1, 1, 1, 2)
    roles = {c["lesion_id"]: c["role"] for c in rep["cases"][0]["clusters"]}
    assert roles == {1: "detection", 2: "duplicate", 3: "fp"}
    # the GT lesion is detected at 0.95, before the FP: sensitivity 1 everywhere
    assert d["froc"]["confidence"]["sensitivity"] == pytest.approx([1.0] * 7)
    # AUC counts the duplicate as a TP cluster: TP {0.95, 0.75} vs FP {0.85} -> 1 of 2 pairs
    assert rep["summary"]["cluster_auc"] == pytest.approx(0.5)


def test_froc_interpolation_auc_and_ece_known_values(tmp_path):
    """Two cases, four lesions, six ranked clusters: every operating point is known.

    ranked: a1 0.95 TP, FP 0.85 (A), b1 0.75 TP, FP 0.65 (B), FP 0.55 (A), a2 0.45 TP; b2 missed.
    points (FP/case, sens): (0, .25) (.5, .25) (.5, .5) (1, .5) (1.5, .5) (1.5, .75)
    """
    ga, pa = blank(), blank()
    box(ga, 1, (0, 3), (0, 4), (0, 4))
    box(ga, 1, (6, 9), (10, 14), (10, 14))
    box(pa, 1, (0, 3), (0, 4), (0, 4))  # a1
    box(pa, 2, (0, 2), (15, 18), (0, 3))  # FP
    box(pa, 3, (10, 12), (0, 3), (15, 18))  # FP
    box(pa, 4, (6, 9), (10, 14), (10, 14))  # a2
    gb, pb = blank(), blank()
    box(gb, 1, (0, 3), (0, 4), (0, 4))
    box(gb, 1, (6, 9), (10, 14), (10, 14))  # b2, missed
    box(pb, 1, (0, 3), (0, 4), (0, 4))  # b1
    box(pb, 2, (10, 12), (16, 19), (0, 3))  # FP
    write_gt(tmp_path / "gt", "A", ga)
    write_gt(tmp_path / "gt", "B", gb)
    write_pred(tmp_path / "pred", "A", pa, [0.95, 0.85, 0.55, 0.45])
    write_pred(tmp_path / "pred", "B", pb, [0.75, 0.65])
    rep = run_eval(tmp_path)
    fr = rep["detection"]["froc"]["confidence"]
    # 1/8, 1/4: 0.25; 1/2, 1: 0.5 (best sensitivity at exactly that rate); 2, 4, 8: 0.75 (plateau)
    assert fr["sensitivity"] == pytest.approx([0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 0.75])
    assert fr["cpm"] == pytest.approx(3.75 / 7)
    assert rep["summary"]["sensitivity_at_0.5fp"] == pytest.approx(0.5)
    assert fr["max_fp_per_case"] == pytest.approx(1.5)
    curve = fr["curve"]
    assert curve["fp_per_case"] == pytest.approx([1.5, 1.5, 1.0, 0.5, 0.5, 0.0, 0.0])
    assert curve["sensitivity"] == pytest.approx([0.75, 0.5, 0.5, 0.5, 0.25, 0.25, 0.0])
    assert curve["threshold"][:-1] == pytest.approx([0.45, 0.55, 0.65, 0.75, 0.85, 0.95])
    # TPs {.95, .75, .45} vs FPs {.85, .65, .55}: 3 + 2 + 0 of 9 pairs
    assert rep["summary"]["cluster_auc"] == pytest.approx(5 / 9)
    # one cluster per bin: ECE = mean |score - is_tp|
    assert rep["summary"]["ece"] == pytest.approx((0.05 + 0.85 + 0.25 + 0.65 + 0.55 + 0.55) / 6, abs=1e-6)
    bins = rep["calibration"]["confidence"]["bins"]
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert [b["fraction_tp"] for b in bins[4:]] == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    # outside the FP range of the data, the note says so
    assert any("at most 1.5 FP/case" in n for n in rep["notes"])


def test_metric_functions_directly():
    # perfectly calibrated bin: four clusters at 0.75, three of them TP
    cal = ev.calibration([0.75, 0.75, 0.75, 0.75], [1, 1, 1, 0])
    assert cal["ece"] == pytest.approx(0.0, abs=1e-6)
    assert cal["bins"][7] == {"lo": pytest.approx(0.7), "hi": pytest.approx(0.8), "count": 4, "mean_score": pytest.approx(0.75), "fraction_tp": 0.75}
    # ties give AUC 0.5; perfect separation 1.0; one class: undefined
    assert ev.cluster_auc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)
    assert ev.cluster_auc([0.2, 0.9, 0.4], [0, 1, 0]) == pytest.approx(1.0)
    assert ev.cluster_auc([0.2, 0.9], [1, 1]) is None
    # FROC: no GT lesions -> undefined; no clusters -> sensitivity 0
    assert ev.froc([], [0.3], 1) is None
    assert ev.froc([None, None], [], 2)["sensitivity"] == [0.0] * 7
    # a detection with confidence exactly 0 is still a detection (MONAI's 0 means "missed")
    assert ev.froc([0.0], [], 1)["cpm"] == pytest.approx(1.0)
    assert ev.dice_score(np.ones((2, 2, 2)), np.ones((2, 2, 2))) == pytest.approx(1.0)
    assert ev.dice_score(np.zeros((2, 2, 2)), np.zeros((2, 2, 2))) == pytest.approx(1.0)


def test_dice_threshold_drops_low_confidence_lesions(tmp_path):
    gt = blank()
    box(gt, 1, (2, 5), (2, 5), (2, 5))
    pred = gt.copy()
    box(pred, 2, (8, 10), (14, 16), (14, 16))
    write_gt(tmp_path / "gt", "T", gt)
    write_pred(tmp_path / "pred", "T", pred, [0.9, 0.2])
    assert run_eval(tmp_path)["summary"]["dice_mean"] == pytest.approx(54 / 62)
    rep = run_eval(tmp_path, dice_threshold=0.5)
    assert rep["summary"]["dice_mean"] == pytest.approx(1.0)
    assert rep["detection"]["n_fp_clusters"] == 1  # detection metrics still see every cluster


# ------------------------------------------------------------------------------ layouts
def _simple_case(tmp_path):
    gt = blank()
    box(gt, 1, (2, 5), (2, 5), (2, 5))
    return gt


def test_flat_gt_layout_and_nested_pred_layout(tmp_path):
    gt = _simple_case(tmp_path)
    # GT like --pred: GTDIR/<case>_lesions.nii.gz ; pred one folder down: OUT/<case>/image_lesions.nii.gz
    _write_volume(gt.astype(np.uint16), tmp_path / "gt" / "X1_lesions.nii.gz")
    _write_volume(gt.astype(np.uint8), tmp_path / "gt" / "X2_label.nii.gz")
    write_pred(tmp_path / "pred" / "X1", "image", gt, [0.9])
    write_pred(tmp_path / "pred", "X2", gt, [0.8])
    rep = run_eval(tmp_path)
    assert sorted(rep["cases_evaluated"]) == ["X1", "X2"]
    assert rep["summary"]["dice_mean"] == pytest.approx(1.0)


def test_single_case_folder_with_generic_stem(tmp_path):
    gt = _simple_case(tmp_path)
    write_gt(tmp_path, "gt", gt)  # tmp/gt/label.nii.gz: GTDIR is the case folder itself
    write_pred(tmp_path / "pred", "image", gt, [0.9])
    rep = run_eval(tmp_path)
    assert rep["cases_evaluated"] == ["image"] and rep["summary"]["cpm"] == pytest.approx(1.0)


def test_cases_filter_and_unpredicted_gt(tmp_path):
    gt = _simple_case(tmp_path)
    for case in ("P1", "P2", "P3"):
        write_gt(tmp_path / "gt", case, gt)
    write_pred(tmp_path / "pred", "P1", gt, [0.9])
    write_pred(tmp_path / "pred", "P2", gt, [0.9])
    rep = run_eval(tmp_path)
    assert rep["cases_without_prediction"] == ["P3"]
    assert any("P3" in n for n in rep["notes"])
    assert run_eval(tmp_path, cases=["P2"])["cases_evaluated"] == ["P2"]
    with pytest.raises(InputError, match="no prediction for case\\(s\\) P3"):
        run_eval(tmp_path, cases=["P1", "P3"])


# ------------------------------------------------------------------------------ errors
def test_missing_ground_truth_names_the_prediction(tmp_path):
    gt = _simple_case(tmp_path)
    write_gt(tmp_path / "gt", "OTHER", gt)
    write_pred(tmp_path / "pred", "Q", gt, [0.9])
    with pytest.raises(InputError) as exc:
        run_eval(tmp_path)
    msg = str(exc.value)
    assert "Q_lesions.nii.gz" in msg and "no ground truth for case 'Q'" in msg and str(tmp_path / "gt" / "Q" / "label.nii.gz") in msg


def test_grid_mismatch_names_both_files(tmp_path):
    gt = _simple_case(tmp_path)
    write_gt(tmp_path / "gt", "G", gt, spacing=(1.0, 1.0, 2.5))
    write_pred(tmp_path / "pred", "G", gt, [0.9])
    with pytest.raises(InputError) as exc:
        run_eval(tmp_path)
    msg = str(exc.value)
    assert "G_lesions.nii.gz" in msg and str(tmp_path / "gt" / "G" / "label.nii.gz") in msg and "grid" in msg
    # a flipped axis alone: the message shows the directions that differ (size, spacing and origin agree)
    write_gt(tmp_path / "gt", "G", gt, direction=(-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    with pytest.raises(InputError) as exc:
        run_eval(tmp_path)
    assert "direction (1.0, 0.0, 0.0," in str(exc.value) and "direction (-1.0, 0.0, 0.0," in str(exc.value)


def test_missing_or_mismatched_table(tmp_path):
    gt = _simple_case(tmp_path)
    write_gt(tmp_path / "gt", "T", gt)
    write_pred(tmp_path / "pred", "T", gt, [0.9])
    table = tmp_path / "pred" / "T_lesions.csv"
    rows = table.read_text(encoding="utf-8")
    table.unlink()
    with pytest.raises(InputError, match="T_lesions.csv is missing"):
        run_eval(tmp_path)
    table.write_text(rows.splitlines()[0] + "\n")  # header only: lesion 1 has no row
    with pytest.raises(InputError, match=r"T_lesions.csv: labelmap T_lesions.nii.gz holds lesion id\(s\) \[1\]"):
        run_eval(tmp_path)
    recs = list(csv.DictReader(io.StringIO(rows)))
    recs[0]["n_voxels"] = "99"  # wrong n_voxels: table of another labelmap
    with open(table, "w", newline="") as fh:
        w = csv.DictWriter(fh, list(recs[0]))
        w.writeheader()
        w.writerows(recs)
    with pytest.raises(InputError, match="table says 99 voxels"):
        run_eval(tmp_path)
    table.write_text(rows.replace("0.9", "1.7"))
    with pytest.raises(InputError, match="confidence 1.7 is not a probability"):
        run_eval(tmp_path)


def test_empty_or_missing_pred_folder(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    with pytest.raises(InputError, match="no `<case>_lesions.nii.gz` labelmaps found"):
        run_eval(tmp_path)
    with pytest.raises(InputError, match="prediction folder not found"):
        ev.evaluate(tmp_path / "nope", tmp_path / "gt")


# ------------------------------------------------------------------------------ report + CLI
def _parser():
    ap = argparse.ArgumentParser(prog="lesionseg")
    ev_cli.register(ap.add_subparsers(dest="command", required=True))
    return ap


def test_cli_writes_report_files(tmp_path, capsys):
    test_froc_interpolation_auc_and_ece_known_values(tmp_path)  # builds pred/ and gt/
    out = tmp_path / "report"
    args = _parser().parse_args(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "-o", str(out)])
    assert args.func(args) == 0
    assert "CPM 0.536" in capsys.readouterr().out
    for name in report_mod.REPORT_FILES:
        assert (out / name).stat().st_size > 0, name
    for png in ("froc.png", "reliability.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = sitk.ReadImage(str(out / png))
        assert min(img.GetSize()[:2]) >= 400
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert rep["summary"]["cpm"] == pytest.approx(3.75 / 7)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "![FROC](froc.png)" in md and "| A |" in md and "0.536" in md
    # errors: exit code 2 and a message naming the file
    bad = _parser().parse_args(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "nowhere")])
    assert bad.func(bad) == 2
    assert "ground-truth folder not found" in capsys.readouterr().err


def test_registered_in_lesionseg_cli():
    from LesionSegLib.engine import cli

    args = cli.build_parser().parse_args(["evaluate", "--pred", "p", "--gt", "g", "--split", "val"])
    assert args.func is ev_cli.cmd_evaluate and ev_cli._case_list(args)[0] == "STS_034"


# ------------------------------------------------------------------------------ real case
def _data_root():
    from LesionSegLib.engine.data import data_root

    return data_root()


@pytest.mark.skipif(not (_data_root() / "sts" / "STS_035").is_dir(), reason="shared CT data folder (LESIONSEG_DATA / ../shared/data) is absent")
def test_real_case_segment_then_evaluate(tmp_path, capsys):
    """Segment STS_035 with the engine (default model, or $LESIONSEG_TEST_MODEL), then evaluate it."""
    from LesionSegLib.engine import cli
    from LesionSegLib.engine.data import case

    c = case("STS_035")
    out = tmp_path / "out"
    seg_args = ["segment", str(c.image), "-o", str(out), "--threshold", "0", "--progress", "none", "--device", "cpu"]
    if os.environ.get("LESIONSEG_TEST_MODEL"):
        seg_args += ["--model", os.environ["LESIONSEG_TEST_MODEL"]]
    assert cli.main(seg_args) == 0, capsys.readouterr().err  # e.g. no default model installed: set $LESIONSEG_TEST_MODEL
    assert (out / "STS_035_lesions.nii.gz").exists()  # named after the case folder
    gt_dir = c.image.parent.parent  # the whole sts folder: other cases are listed as unpredicted
    rep_dir = tmp_path / "report"
    assert cli.main(["evaluate", "--pred", str(out), "--gt", str(gt_dir), "-o", str(rep_dir), "--cases", "STS_035"]) == 0, capsys.readouterr().err
    rep = json.loads((rep_dir / "report.json").read_text(encoding="utf-8"))
    for name in report_mod.REPORT_FILES:
        assert (rep_dir / name).stat().st_size > 0
    # the report names the command that made it (a README figure is cited beside its command)
    assert rep["command"] == f"lesionseg evaluate --pred {out} --gt {gt_dir} -o {rep_dir} --cases STS_035"
    assert f"- command: `{rep['command']}`" in (rep_dir / "report.md").read_text(encoding="utf-8")
    s = rep["summary"]
    assert rep["cases_evaluated"] == ["STS_035"] and s["n_gt_lesions"] == 1  # manifest: one tumour
    for key in ("dice_mean", "dice_global", "sensitivity_at_0.5fp", "cpm", "ece"):
        assert 0.0 <= s[key] <= 1.0, key
    assert s["cluster_auc"] is None or 0.0 <= s["cluster_auc"] <= 1.0
    # recompute Dice and the cluster count independently from the files
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "STS_035_lesions.nii.gz")))
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(c.label)))
    p, g = pred > 0, gt > 0
    assert s["dice_mean"] == pytest.approx(2 * np.count_nonzero(p & g) / (p.sum() + g.sum()), abs=1e-6)
    with open(out / "STS_035_lesions.csv") as fh:
        n_rows = sum(1 for _ in csv.DictReader(fh))
    assert s["n_clusters"] == n_rows == len(np.unique(pred)) - 1
    d = rep["detection"]
    assert d["n_detected"] + d["n_fp_clusters"] + d["n_duplicates"] == n_rows


def test_the_prediction_folder_is_refused_as_its_own_ground_truth(tmp_path):
    """An audit: ``evaluate --pred out --gt out`` took each <case>_lesions.nii.gz as its own ground
    truth and reported Dice 1.0, sensitivity 1.0, with no word."""
    import SimpleITK as sitk

    from LesionSegLib.engine.errors import InputError
    from LesionSegLib.engine.evaluate.pairing import pair_cases

    out = tmp_path / "out"
    out.mkdir()
    lab = np.zeros((8, 16, 16), np.uint16)
    lab[2:5, 4:8, 4:8] = 1
    sitk.WriteImage(sitk.GetImageFromArray(lab), str(out / "case1_lesions.nii.gz"))
    (out / "case1_lesions.csv").write_text("lesion_id,confidence\n1,0.9\n")
    with pytest.raises(InputError, match="the ground truth found for case 'case1' is its own prediction"):
        pair_cases(out, out)
