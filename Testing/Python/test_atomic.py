"""Output commits (``engine.atomic``) when interrupted at the edges a second audit found:
while waiting for another process's lock on the output folder, and with both SIGINT and SIGTERM
held during the renames."""
from __future__ import annotations

import signal

import pytest

from test_engine import _contents, _old_outputs, _sigterm_exits, _write_new


def test_an_interrupt_while_waiting_for_the_folder_lock_leaves_no_temporary(tmp_path, monkeypatch):
    """A SIGTERM or Ctrl-C while another run held the folder's lock left the complete new outputs
    behind as ``.tmp-*`` files (0600): the pending list was emptied before the lock was taken."""
    import fcntl

    from LesionSegLib.engine import atomic

    out = tmp_path / "out"
    _old_outputs(out)

    def interrupted(fd, op):
        raise KeyboardInterrupt  # what Ctrl-C raises inside the blocking flock

    monkeypatch.setattr(fcntl, "flock", interrupted)
    w = atomic.AtomicWriter(out)
    _write_new(w)
    with pytest.raises(KeyboardInterrupt):
        w.commit()
    assert _contents(out) == {"a.seg.nrrd": "old", "a_lesions.csv": "old", "a_lesions.nii.gz": "old"}  # no .tmp-*


def test_sigterm_held_beside_sigint_is_delivered_not_lost():
    """Both signals arrived while held: SIGINT's handler raised KeyboardInterrupt first and the
    SIGTERM was never delivered (exit 130 instead of 143)."""
    from LesionSegLib.engine import atomic

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (CI may ignore SIGINT)
    try:
        with _sigterm_exits(), pytest.raises(SystemExit) as exc:
            with atomic.signals_held():
                signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # delivered (as Python does) while held
                signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert exc.value.code == 128 + signal.SIGTERM


def test_committed_outputs_and_model_folders_get_the_umask_mode(tmp_path, monkeypatch):
    """``mkstemp`` creates 0600 files and ``mkdtemp`` 0700 folders: committed outputs (CSV, NIfTI,
    seg.nrrd, cards) and model folders must get what ``open()`` and ``mkdir`` would give under the
    user's umask, or colleagues sharing the folder cannot read them.  The modes are set to 0640 /
    0750 here, so the check does not depend on this machine's umask."""
    import os
    import stat

    from LesionSegLib.engine import atomic

    assert (atomic.FILE_MODE, atomic.DIR_MODE) == (0o666 & ~atomic.UMASK, 0o777 & ~atomic.UMASK)
    monkeypatch.setattr(atomic, "FILE_MODE", 0o640)
    monkeypatch.setattr(atomic, "DIR_MODE", 0o750)
    with atomic.AtomicWriter(tmp_path / "out") as w:
        for name in ("a_lesions.csv", "a.seg.nrrd"):
            with open(w.path(name), "w") as fh:
                fh.write("x")
    for name in ("a_lesions.csv", "a.seg.nrrd"):
        assert stat.S_IMODE(os.stat(tmp_path / "out" / name).st_mode) == 0o640, name
    with atomic.atomic_folder(tmp_path / "models" / "m") as folder:
        (folder / "card.json").write_text("{}")
    assert stat.S_IMODE(os.stat(tmp_path / "models" / "m").st_mode) == 0o750


# ------------------------------------------------------------------ folders a killed build left behind
_BUILD = """
import sys, time
sys.path.insert(0, {lib!r})
from LesionSegLib.engine.atomic import atomic_folder
with atomic_folder({folder!r}) as tmp:
    (tmp / "segmenter.safetensors").write_bytes(b"x" * 1000)
    print("building", flush=True)
    time.sleep(120)
"""


def _start_build(folder):
    import subprocess
    import sys
    from pathlib import Path

    lib = str(Path(__file__).resolve().parents[2] / "LesionSeg")
    proc = subprocess.Popen([sys.executable, "-c", _BUILD.format(lib=lib, folder=str(folder))], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "building"
    return proc


def test_a_killed_build_s_folder_is_removed_by_the_next_build_and_a_live_one_is_not(tmp_path):
    """On Windows, Cancel ends a training's worker process outright, so a cancelled retrain left a
    ``.tmp-<version>-*`` folder (a whole model's weights) in the user model folder for good."""
    from LesionSegLib.engine import atomic

    parent = tmp_path / "models" / "sts-clcs"
    killed, live = _start_build(parent / "2"), _start_build(parent / "3")
    try:
        killed.kill()
        killed.wait()
        left = sorted(p.name for p in parent.iterdir())
        assert len(left) == 2 and all(n.startswith(".tmp-") for n in left)
        with atomic.atomic_folder(parent / "4") as tmp:
            (tmp / "card.json").write_text("{}")
        names = sorted(p.name for p in parent.iterdir())
        assert "4" in names and any(n.startswith(".tmp-3-") for n in names)  # the live build keeps its folder
        assert not any(n.startswith(".tmp-2-") for n in names)  # the killed one's is gone
        assert sorted(p.name for p in (parent / "4").iterdir()) == ["card.json"]  # no owner record in the result
    finally:
        live.kill()
        live.wait()


def test_only_folders_with_an_owner_record_are_removed_another_computer_s_after_a_day(tmp_path):
    import json
    import os
    import socket
    import time

    from LesionSegLib.engine import atomic

    plain, foreign = tmp_path / ".tmp-a-1", tmp_path / ".tmp-b-2"
    plain.mkdir()
    foreign.mkdir()
    (foreign / atomic.OWNER_NAME).write_text(json.dumps({"pid": os.getpid(), "started": 0, "host": socket.gethostname() + "-other"}))
    (tmp_path / ".tmp-c.csv").write_text("a file: the batch's own sweep handles those")
    assert atomic.remove_abandoned(tmp_path) == []  # young: another computer may still be building it
    old = time.time() - atomic.ABANDONED_AFTER_S - 60
    for d in (plain, foreign):
        os.utime(d, (old, old))
    assert [p.name for p in atomic.remove_abandoned(tmp_path)] == [".tmp-b-2"]
    assert plain.is_dir() and (tmp_path / ".tmp-c.csv").exists()  # no owner record: maybe the user's, never removed


def test_a_version_still_being_built_is_not_listed_as_a_model(tmp_path, monkeypatch):
    import shutil

    from LesionSegLib.engine import models

    monkeypatch.setenv("LESIONSEG_MODELS", str(tmp_path))
    src = models.get_card("sts-clcs").folder
    shutil.copytree(src, tmp_path / "mine" / ".tmp-7-abc", ignore=shutil.ignore_patterns(".onnx-cache"))
    card = tmp_path / "mine" / ".tmp-7-abc" / "card.json"
    card.write_text(card.read_text().replace('"version": "1.2.0"', '"version": "7"').replace('"name": "sts-clcs"', '"name": "mine"'))
    assert "mine@7" not in {c.id for c in models.list_models()}


def test_owner_records_survive_a_clock_step_a_reused_pid_and_hostile_json(tmp_path):
    """The start time a process reports moves when the clock is stepped (NTP, resume), which made a
    live build's folder look abandoned; a malformed owner record (a pid of 1e400, JSON nested too
    deep) crashed every later build in that folder."""
    import json
    import os
    import socket

    import psutil

    from LesionSegLib.engine import atomic

    me = atomic._owner_record()
    assert me["pid"] == os.getpid() and me["command"] == atomic._command_digest(psutil.Process())
    assert atomic._owner_alive(me)
    assert atomic._owner_alive({**me, "started": me["started"] + 2.0})  # clock stepped: same pid, same command
    assert not atomic._owner_alive({**me, "started": me["started"] - 60.0, "command": "0" * 64})  # pid reused by another program
    assert not atomic._owner_alive({k: v for k, v in me.items() if k != "command"} | {"started": me["started"] - 60.0})
    host = socket.gethostname()
    hostile = {"huge-pid": '{"pid": 1e400, "started": 0, "host": "%s"}' % host,
               "deep": "[" * 100000 + "]" * 100000, "not-a-dict": "[1, 2]",
               "bad-pid": '{"pid": "x", "started": 0, "host": "%s"}' % host}
    for name, text in hostile.items():
        (tmp_path / f".tmp-{name}").mkdir()
        (tmp_path / f".tmp-{name}" / atomic.OWNER_NAME).write_text(text)
    assert atomic.remove_abandoned(tmp_path) == []  # kept: LesionSeg cannot tell whose they are
    with atomic.atomic_folder(tmp_path / "v1") as tmp:  # and a build beside them runs
        (tmp / "card.json").write_text(json.dumps({}))
    assert (tmp_path / "v1" / "card.json").is_file()
