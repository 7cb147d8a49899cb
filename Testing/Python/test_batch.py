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
