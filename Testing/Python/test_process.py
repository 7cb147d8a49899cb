"""The one child-process runner (``engine.process``): lines, exit codes, tree cancel, timeout, RSS."""
from __future__ import annotations

import sys
import time

import psutil

from LesionSegLib.engine.process import ChildProcess, child_env, python_executable, tree_alive

# a child that starts a grandchild (as Slicer's PythonSlicer launcher starts python), prints
# the grandchild's pid, then prints numbered lines until it is stopped
TREE = (
    "import subprocess, sys, time\n"
    "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
    "print('grandchild', g.pid, flush=True)\n"
    "print('to stderr', file=sys.stderr, flush=True)\n"
    "i = 0\n"
    "while True:\n"
    "    print('line', i, flush=True); i += 1; time.sleep(0.05)\n"
)


def _collect():
    lines: list[tuple[str, str]] = []
    return lines, lambda stream, line: lines.append((stream, line))


def _wait_for(cond, timeout=60.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.02)


def test_lines_and_exit_code():
    lines, on_line = _collect()
    code = "import sys; print('a'); print('b\\r'); print('err', file=sys.stderr); sys.exit(3)"
    p = ChildProcess([sys.executable, "-c", code], on_line=on_line).start()
    assert p.wait(60) == 3 and p.returncode == 3 and not p.terminated and not p.timed_out
    assert [ln for s, ln in lines if s == "stdout"] == ["a", "b"]
    assert [ln for s, ln in lines if s == "stderr"] == ["err"]
    assert p.wall_s > 0


def test_terminate_kills_the_whole_tree():
    lines, on_line = _collect()
    p = ChildProcess([sys.executable, "-c", TREE], on_line=on_line).start()
    _wait_for(lambda: any(ln.startswith("line") for s, ln in lines))
    grandchild = int(next(ln for s, ln in lines if ln.startswith("grandchild")).split()[1])
    assert tree_alive([p.pid, grandchild])
    assert psutil.Process(grandchild).ppid() == p.pid
    p.terminate(grace=2)
    assert p.terminated and p.returncode is not None and p.returncode != 0  # the code is kept, not lost to psutil
    assert not tree_alive([p.pid, grandchild])
    assert ("stderr", "to stderr") in lines


def test_terminate_kills_a_child_that_ignores_sigterm():
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN) if hasattr(signal, 'SIGTERM') else None\n"
            "print('ready', flush=True)\ntime.sleep(300)")
    lines, on_line = _collect()
    p = ChildProcess([sys.executable, "-c", code], on_line=on_line).start()
    _wait_for(lambda: lines)
    t = time.monotonic()
    p.terminate(grace=0.5)
    assert p.returncode is not None and not tree_alive([p.pid])
    assert time.monotonic() - t < 30  # terminate, then kill: it does not hang


def test_timeout_stops_the_child():
    p = ChildProcess([sys.executable, "-c", "import time; time.sleep(300)"], timeout=0.5).start()
    rc = p.wait(60)
    assert p.timed_out and p.terminated and rc != 0 and not tree_alive([p.pid])


def test_peak_rss_is_sampled():
    code = "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.0)"
    p = ChildProcess([sys.executable, "-c", code], sample_rss=0.02).start()
    assert p.wait(60) == 0
    assert p.peak_rss_bytes > 200 * 2**20


def test_child_env_and_interpreter(tmp_path):
    env = child_env({"PYTHONPATH": "/x"}, {"EXTRA": "1"})
    assert env["PYTHONPATH"].endswith("/x") and env["PYTHONPATH"] != "/x" and env["EXTRA"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    lines, on_line = _collect()
    p = ChildProcess([python_executable(), "-c", "import LesionSegLib, os; print(os.getcwd())"], env=env, cwd=tmp_path, on_line=on_line).start()
    assert p.wait(60) == 0 and lines == [("stdout", str(tmp_path))]
