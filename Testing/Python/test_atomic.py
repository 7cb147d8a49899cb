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
