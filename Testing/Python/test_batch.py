"""``lesionseg batch`` on a local Ray instance with real CT: same files as ``segment``, the report
of a bad row, a worker killed mid-case (retried), a killed batch resumed, Ctrl-C leaving no
half-written case, an unreachable cluster."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from LesionSegLib.engine import cli, data
from LesionSegLib.engine.batch.cases import REPORT_NAME, read_cases
from LesionSegLib.engine.batch.runner import plan
from LesionSegLib.engine.cli.batch import _model_key

DATA = data.data_root()
REPO = Path(__file__).resolve().parents[2]
SMALL = ["STS_019", "STS_025", "STS_008"]  # the three smallest STS crops
NO_DATA = f"shared CT data folder {DATA} is absent (set LESIONSEG_DATA)"  # the only reason to skip
pytestmark = pytest.mark.skipif(not (DATA / "sts" / "STS_019").is_dir(), reason=NO_DATA)  # no LESIONSEG_DATA
NRRD_DATE = re.compile(rb"^# on \d{4}-\d\d-\d\d [\d:]+\(GMT\)\.\n", re.M)  # pynrrd's write-time comment


def _manifest(tmp_path, names, extra_rows=()):
    rows = [f"{n},{DATA / 'sts' / n / 'image.nii.gz'}" for n in names] + list(extra_rows)
    p = tmp_path / "manifest.csv"
    p.write_text("case,image\n" + "\n".join(rows) + "\n")
    return p


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "LesionSeg"), str(REPO / "LesionSegTraining"), env.get("PYTHONPATH", "")])
    return env


def _batch(*args, **kw):
    cmd = [sys.executable, "-m", "LesionSegLib.engine.cli", "batch", *map(str, args), "--progress", "json"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), **kw)


def _report(outdir):
    with open(outdir / REPORT_NAME, newline="") as fh:
        return {r["case"]: r for r in csv.DictReader(fh)}


def _content(path: Path) -> bytes:
    b = path.read_bytes()
    return NRRD_DATE.sub(b"", b) if path.name.endswith(".nrrd") else b


def test_batch_two_workers_equals_segment_and_reports_bad_row(tmp_path):
    ref = tmp_path / "ref"
    inputs = [DATA / "sts" / n / "image.nii.gz" for n in SMALL]
    # the workers run 1 thread each (--cpus-per-task 1); OpenVINO's sums depend on the thread count
    # (confidences differ by ~1e-4 between 1 and 2 threads), so the reference uses 1 thread too
    assert cli.main(["segment", *map(str, inputs), "-o", str(ref), "--progress", "none", "--threads", "1"]) == 0
    man = _manifest(tmp_path, SMALL, [f"ghost,{tmp_path / 'missing' / 'image.nii.gz'}", "noimage,"])
    out = tmp_path / "out"
    p = _batch(man, "-o", out, "--num-workers", "2")
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 1, stderr  # two bad rows -> exit 1, the others done
    events = [json.loads(ln) for ln in stdout.splitlines() if ln.startswith("{")]
    assert [e["workers"] for e in events if e["event"] == "connected"] == [2]
    rep = _report(out)
    assert {n: rep[n]["status"] for n in SMALL} == dict.fromkeys(SMALL, "done")
    assert rep["ghost"]["status"] == "failed" and "image not found" in rep["ghost"]["error"]
    assert rep["noimage"]["status"] == "failed" and "no image path" in rep["noimage"]["error"]
    assert len({rep[n]["worker"] for n in SMALL}) <= 2 and all(rep[n]["worker"] for n in SMALL)
    summary = [e for e in events if e["event"] == "summary"][0]
    assert summary["workers_started"] == 2  # each loaded the model once for its cases
    # file for file: what segment wrote, batch wrote with the same bytes (bar pynrrd's date line)
    ref_files = sorted(f.name for f in ref.iterdir())
    assert len(ref_files) == 3 * len(SMALL)
    for name in ref_files:
        assert _content(out / name) == _content(ref / name), name
    extra = {f.name for f in out.iterdir()} - set(ref_files)
    assert extra == {REPORT_NAME, ".batch.lock", *(f"{n}.done.json" for n in SMALL)}


def _read_events(proc, until, deadline_s=400):
    """JSON events from ``proc`` up to and including the first for which ``until(event)``."""
    seen = []
    t0 = time.time()
    for line in proc.stdout:
        if line.startswith("{"):
            seen.append(json.loads(line))
            if until(seen[-1]):
                return seen
        assert time.time() - t0 < deadline_s, seen
    raise AssertionError(f"batch ended before the awaited event: {seen}; {proc.stderr.read()}")


def test_batch_worker_killed_retried_killed_batch_resumed_ctrl_c_clean(tmp_path):
    # one small crop, then whole chest CTs (lung2 under four more case names): the worker is killed
    # while it runs the first chest CT (one to two seconds; a small crop, half a second, could end
    # before the kill lands, which made an earlier version of this test flaky), and the kill of
    # the first run and the Ctrl-C of the second land while chest CTs are still queued
    chest = {"lung1": "lung1", "lung2": "lung2", "lung2b": "lung2", "lung2c": "lung2", "lung2d": "lung2", "lung2e": "lung2"}
    names = [*SMALL[:1], *chest]
    man = _manifest(tmp_path, SMALL[:1], [f"{n},{DATA / 'fullscan' / src / 'image.nii.gz'}" for n, src in chest.items()])
    out = tmp_path / "out"
    p = _batch(man, "-o", out, "--num-workers", "1", start_new_session=True)
    try:
        first = _read_events(p, lambda e: e["event"] == "case")[-1]
        assert first["status"] == "done"
        pid = int(first["worker"].rsplit(":", 1)[1])
        os.kill(pid, signal.SIGKILL)  # the worker is now running the second case, a chest CT
        retry = _read_events(p, lambda e: e["event"] in ("retry", "case"))[-1]
        assert retry["event"] == "retry" and "died" in retry["message"]
        second = _read_events(p, lambda e: e["event"] == "case")[-1]
        assert second["status"] == "done" and second["attempts"] == 2 and second["worker"] != first["worker"]
        os.killpg(p.pid, signal.SIGKILL)  # kill the whole batch (driver and local Ray) mid third case
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    done = [first["case"], second["case"]]
    rest = [n for n in names if n not in done]
    assert not [n for n in rest if (out / f"{n}.done.json").exists()]
    rep = _report(out)  # the report of the killed run says what happened so far
    assert rep[second["case"]]["status"] == "done" and "died during attempt 1" in rep[second["case"]]["error"]
    # rerun, interrupted by Ctrl-C (SIGINT to its process group) once one more case is done
    p = _batch(man, "-o", out, "--num-workers", "1", start_new_session=True)
    try:
        third = _read_events(p, lambda e: e["event"] == "case" and e["status"] == "done")[-1]
        os.kill(p.pid, signal.SIGINT)  # the driver handles Ctrl-C (and stops the Ray processes it started)
        _, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=60)
    assert p.returncode == 130, stderr
    last = [n for n in rest if n != third["case"]]
    rep = _report(out)
    assert {n: rep[n]["status"] for n in done} == dict.fromkeys(done, "skipped")
    assert rep[third["case"]]["status"] == "done"
    # the case running at Ctrl-C and the queued ones are cancelled (one may have finished meanwhile)
    cancelled = [n for n in last if rep[n]["status"] == "cancelled"]
    assert cancelled and all(rep[n]["status"] in ("cancelled", "done") for n in last), rep
    assert not list(out.glob(".tmp-*")) and not [n for n in cancelled if list(out.glob(f"{n}[_.]*"))]  # nothing half-written
    # third run: only the cancelled cases are left to do
    p = _batch(man, "-o", out, "--num-workers", "1")
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr
    rep = _report(out)
    assert {n: rep[n]["status"] for n in names} == {**{n: "skipped" for n in names if n not in cancelled},
                                                    **dict.fromkeys(cancelled, "done")}
    assert not list(out.glob(".tmp-*"))
    # a fourth run would have nothing to do; --force redoes every case
    key = _model_key(None)[1]
    assert plan(read_cases(man), str(out), key, None, force=False)[0] == []
    assert [c.name for c in plan(read_cases(man), str(out), key, None, force=True)[0]] == names


def test_batch_unreachable_address_is_one_line_error(tmp_path):
    man = _manifest(tmp_path, SMALL[:1])
    t0 = time.time()
    p = _batch(man, "-o", tmp_path / "out", "--address", "ray://127.0.0.1:9")
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 2
    assert time.time() - t0 < 30
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert errors == [next(ln for ln in stderr.splitlines() if "cannot reach the Ray cluster at ray://127.0.0.1:9" in ln)]


def test_batch_cancels_when_interrupt_flag_is_set_even_without_the_exception(tmp_path):
    """The batch loop polls ``interrupted()``: a Ctrl-C whose KeyboardInterrupt a library swallowed
    still cancels the batch (the CLI's SIGINT handler sets the flag before it raises)."""
    from LesionSegLib.engine.batch.runner import run_batch

    man = _manifest(tmp_path, SMALL)
    out = tmp_path / "out"
    model, key = _model_key(None)
    seen = []
    with pytest.raises(KeyboardInterrupt):
        run_batch(read_cases(man), str(out), model=model, model_key=key, num_workers=1,
                  on_event=lambda case, info: seen.append((case.name, case.status)),
                  interrupted=lambda: any(s == "done" for _, s in seen))
    rep = _report(out)
    done = [n for n in SMALL if rep[n]["status"] == "done"]
    assert len(done) == 1 and [rep[n]["status"] for n in SMALL if n not in done] == ["cancelled", "cancelled"]
    assert not list(out.glob(".tmp-*")) and not list(Path(out).glob(".*tmp*"))


# ------------------------------------------------------------------------------ found by an audit
def test_batch_connect_keeps_sigterm_handler_and_refuses_infeasible_resources():
    """``ray.init`` replaced the CLI's SIGTERM handler with its own (a SIGTERM killed the batch with
    exit 15, rows left ``pending``); a request no node can hold (``--gpus-per-task 1`` without a
    GPU, more CPUs per task than the machine has) waited 10 minutes in silence."""
    import ray

    from LesionSegLib.engine.batch import runner

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, handler)
    try:
        runner.connect(None, num_cpus=1)
        assert signal.getsignal(signal.SIGTERM) is handler
        runner.check_resources(1, 0)
        with pytest.raises(runner.BatchError, match="--gpus-per-task 1 cannot be met"):
            runner.check_resources(1, 1)
        with pytest.raises(runner.BatchError, match="--cpus-per-task 2 cannot be met"):
            runner.check_resources(2, 0)
    finally:
        ray.shutdown()
        for s, h in old.items():
            signal.signal(s, h)


def test_batch_model_folder_is_passed_as_its_path_and_keyed_by_its_whole_card(tmp_path):
    """``batch --model FOLDER`` passed only the card's id to the workers: an unregistered folder
    failed every case, an edited copy of a registered model ran the registered one, and the
    done-marker's key (the segmenter's checksum) could not tell them apart."""
    from LesionSegLib.engine.models import BUILTIN_DIR

    src = BUILTIN_DIR / "sts-clcs"
    mine = tmp_path / "mine"
    mine.mkdir()
    for f in src.iterdir():
        if f.name != "card.json":
            (mine / f.name).symlink_to(f)
    card = json.loads((src / "card.json").read_text())
    card["confidence_threshold"] = 0.999  # same id, same weights, another model
    (mine / "card.json").write_text(json.dumps(card))
    load, key = _model_key(str(mine))
    assert load == str(mine)  # the folder, not the registry's sts-clcs
    assert key.split(":")[0] == _model_key("sts-clcs")[1].split(":")[0] and key != _model_key("sts-clcs")[1]


def test_batch_folder_of_case_folders_lists_every_case_or_says_why_not(tmp_path):
    """Only ``<case>/image.*`` counted: ``P2/P2.nii.gz``, ``P3/P3_ct.nii.gz``, a DICOM series one
    level deeper, a DICOM folder with a seg.nii.gz beside it and case folders next to loose
    scans were skipped without a row (exit 0)."""
    from LesionSegLib.engine.io.images import expand_inputs

    root = tmp_path / "cohort"
    img = DATA / "sts" / "STS_019" / "image.nii.gz"
    files = {"loose.nii.gz": img, "P1/image.nii.gz": img, "P1/label.nii.gz": img, "P2/P2.nii.gz": img,
             "P2/P2_label.nii.gz": img, "P3/P3_ct.nii.gz": img, "PAT3/study/series/1.dcm": None,
             "PAT4/1.dcm": None, "PAT4/seg.nii.gz": img, "two/a.nii.gz": img, "two/b.nii.gz": img,
             "labels/mask.nii.gz": img, "empty/.hidden": None, "PAT5/1.dcm": None, "PAT5/notes.txt": None,
             "PAT5/PAT5_mask.nii.gz": img,
             # not cases: macOS's zip residue, and an earlier run's outputs kept inside the cohort
             "__MACOSX/P1/._image.nii.gz": None, "out/P1_lesions.nii.gz": img, "out/P1_lesions.csv": None,
             "out/P1.seg.nrrd": None, "out/evaluation/report.json": None, "out/evaluation/froc.png": None}
    for rel, target in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(target) if target else (root / rel).write_bytes(b"\0" * 132)
    cases = read_cases(root)
    assert [c.input for c in cases] == [str(p) for p in expand_inputs([root])]
    got = {c.name: (os.path.relpath(c.input, root), c.error.split(": ", 1)[-1]) for c in cases}
    assert got == {"loose": ("loose.nii.gz", ""), "P1": ("P1/image.nii.gz", ""), "P2": ("P2/P2.nii.gz", ""),
                   "P3_ct": ("P3/P3_ct.nii.gz", ""), "PAT3": ("PAT3", ""), "PAT4": ("PAT4", ""),
                   "empty": ("empty", "folder holds no image files and no DICOM series"),
                   "labels": ("labels", "folder holds only label maps (mask.nii.gz), no scan"),
                   "PAT5": ("PAT5", ""),  # other files beside the label map: maybe a DICOM series, read at run time
                   "two": ("two", "folder holds 2 scans (a.nii.gz, b.nii.gz), not one; give them as separate inputs")}
    from LesionSegLib.engine.errors import InputError
    from LesionSegLib.engine.io.images import read_image

    with pytest.raises(InputError, match=r"folder holds only label maps \(PAT5_mask.nii.gz\), no scan"):
        read_image(root / "PAT5")  # no series in it after all: the reason is the label map, not "no image files"


def test_batch_bad_names_manifests_lock_and_output_are_refused(tmp_path, capsys):
    """A case named ``.tmp-*`` (from a plain list) had its outputs deleted as temporaries; a
    250-character case name aborted the batch (File name too long); a header-only manifest ran
    "0 of 0 cases" (exit 0); a planted ``.batch.lock`` symlink made the batch create its target
    outside the folder; ``-o FILE`` was not refused up front."""
    from LesionSegLib.engine.batch.cases import check_complete, lock_outdir
    from LesionSegLib.engine.errors import InputError

    img = DATA / "sts" / "STS_019" / "image.nii.gz"
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / ".tmp-pat7.nii.gz").symlink_to(img)
    (tmp_path / "list.txt").write_text("# cases\nx/.tmp-pat7.nii.gz\n")
    assert "invalid case name '.tmp-pat7'" in read_cases(tmp_path / "list.txt")[0].error
    long = "K" * 250
    rows = read_cases(_manifest(tmp_path, [], [f"{long},{img}", f"ok,{img}"]))
    assert "case name too long" in rows[0].error and not rows[1].error
    out = tmp_path / "out"
    out.mkdir()
    assert check_complete(out, rows[0], "m", None)[0] is False  # no ENAMETOOLONG
    for name, text in (("h.csv", "case,image\n"), ("c.txt", "# nothing yet\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match="lists no cases"):
            read_cases(tmp_path / name)
    (out / ".batch.lock").symlink_to(tmp_path / "victim")
    with pytest.raises(InputError, match="symbolic link"), lock_outdir(out):
        pass
    assert not (tmp_path / "victim").exists()
    (tmp_path / "afile").write_text("hi")
    assert cli.main(["batch", str(tmp_path / "list.txt"), "-o", str(tmp_path / "afile"), "--progress", "none"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_batch_address_of_a_listener_that_is_no_ray_gives_up(tmp_path):
    """``--address 127.0.0.1:PORT`` of a listener that is no Ray blocked ``ray.init`` in C++ for
    ever (SIGALRM could not interrupt it); it now gives up after the connect deadline."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    code = ("from LesionSegLib.engine.batch import runner; runner.CONNECT_TIMEOUT_S = 3; "
            f"runner.connect('127.0.0.1:{srv.getsockname()[1]}')")
    try:
        t0 = time.time()
        p = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=90)
    finally:
        srv.close()
    assert p.returncode == 1 and "no answer within 3 s" in p.stderr.splitlines()[-1], p.stderr[-2000:]
    assert time.time() - t0 < 60
