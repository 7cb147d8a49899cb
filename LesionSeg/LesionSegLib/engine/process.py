"""THE child-process runner: start, stream output lines, cancel (whole tree), timeout, peak RSS.

Used by the Slicer side (``LesionSegLib.runner``: segmentation in the background), by the
engine's long jobs (``engine.learn.jobs``: training, retraining) and by the benchmark.

* The child runs in its own session (POSIX) or process group (Windows), so a Ctrl-C in the
  parent's terminal does not reach it and it never shares a group with the parent.
* stdout and stderr are read line by line by two daemon threads and handed to ``on_line(stream,
  line)`` (``stream`` is ``"stdout"`` or ``"stderr"``); the call never blocks on a full pipe.
* :meth:`ChildProcess.terminate` stops the whole tree with psutil: the child and every
  descendant, listed *before* any signal is sent (a PID found later could already be reused),
  terminated, waited for ``grace`` seconds, then killed.  That also covers Slicer's Windows
  ``PythonSlicer.exe``, a launcher that starts the real ``python.exe`` as its child: killing the
  launcher alone would leave the interpreter running.  No process group id is signalled after
  its leader was reaped.
* ``timeout``: :meth:`poll` terminates a child that has run longer and sets ``timed_out``.
* ``sample_rss``: a thread samples the resident memory of the whole tree (psutil) every
  ``sample_rss`` seconds; :attr:`peak_rss_bytes` is the largest sum seen.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import psutil

#: the folder holding the ``LesionSegLib`` package (children get it on their PYTHONPATH)
LIB_PARENT = Path(__file__).resolve().parents[2]


def python_executable() -> str:
    """The interpreter to run engine children with: Slicer's ``PythonSlicer`` next to the
    running executable when there is one (never one found on PATH, which may belong to another
    Slicer install), else this interpreter."""
    exe = Path(sys.executable)
    for cand in (exe.with_name("PythonSlicer"), exe.with_name("PythonSlicer.exe")):
        if cand.exists():
            return str(cand)
    return sys.executable


def child_env(base: dict | None = None, extra: dict | None = None) -> dict:
    """An environment in which ``python -m LesionSegLib...`` imports this very package, unbuffered."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([str(LIB_PARENT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class ChildProcess:
    """One child process; see the module docstring."""

    def __init__(self, argv: Sequence[str], *, env: dict | None = None, cwd: str | os.PathLike | None = None,
                 on_line: Callable[[str, str], None] | None = None, timeout: float | None = None,
                 sample_rss: float | None = None):
        self.argv = [str(a) for a in argv]
        self.env = env
        self.cwd = None if cwd is None else str(cwd)
        self.on_line = on_line
        self.timeout = timeout
        self.sample_rss = sample_rss
        self.popen: subprocess.Popen | None = None
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.timed_out = False
        self.terminated = False
        self.peak_rss_bytes = 0
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    # ------------------------------------------------------------------------------ start
    def start(self) -> "ChildProcess":
        if self.popen is not None:
            raise RuntimeError("this process was already started")
        kw: dict = {}
        if os.name == "nt":
            kw["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kw["start_new_session"] = True
        self.started_at = time.monotonic()
        self.popen = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=self.env,
            cwd=self.cwd, text=True, encoding="utf-8", errors="replace", bufsize=1, **kw,
        )
        for name, stream in (("stdout", self.popen.stdout), ("stderr", self.popen.stderr)):
            self._spawn(self._read, name, stream)
        if self.sample_rss:
            self._spawn(self._sample)
        return self

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True, name=f"child-{target.__name__}")
        t.start()
        self._threads.append(t)

    def _read(self, name: str, stream) -> None:
        for raw in stream:
            if self.on_line is not None:
                try:
                    self.on_line(name, raw.rstrip("\r\n"))
                except Exception:  # a callback error must not stop the reader (the pipe would fill up)
                    pass
        stream.close()

    def _sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_rss_bytes = max(self.peak_rss_bytes, total)
            self._stop.wait(self.sample_rss)

    # ------------------------------------------------------------------------------ state
    @property
    def pid(self) -> int:
        if self.popen is None:
            raise RuntimeError("the process has not been started")
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def poll(self) -> int | None:
        """None while the child runs, else its exit code; enforces ``timeout``."""
        if self.popen is None:
            return None
        rc = self.popen.poll()
        if rc is None and self.timeout is not None and time.monotonic() - self.started_at > self.timeout:
            self.timed_out = True
            self.terminate()
            rc = self.popen.poll()
        if rc is not None:
            self._finish()
        return rc

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> int:
        """Block until the child ends (``TimeoutError`` after ``timeout`` seconds; the child is
        left running then, as :meth:`subprocess.Popen.wait` does)."""
        end = None if timeout is None else time.monotonic() + timeout
        while (rc := self.poll()) is None:
            if end is not None and time.monotonic() > end:
                raise TimeoutError(f"process {self.pid} did not end within {timeout:g} s")
            time.sleep(interval)
        return rc

    def _finish(self) -> None:
        if self.ended_at is None:
            self.ended_at = time.monotonic()
            self._stop.set()
            for t in self._threads:
                t.join(timeout=5)

    @property
    def wall_s(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.ended_at or time.monotonic()) - self.started_at

    # ------------------------------------------------------------------------------ stop
    def terminate(self, grace: float = 3.0) -> None:
        """Stop the child and all its descendants: terminate, wait ``grace`` s, kill what is left."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.terminated = True
        terminate_tree(self.popen.pid, grace, self.popen)
        if self.popen.poll() is not None:
            self._finish()


def terminate_tree(pid: int, grace: float = 3.0, popen: subprocess.Popen | None = None) -> list[int]:
    """Terminate ``pid`` and its descendants (all listed first), wait up to ``grace`` s, kill
    the survivors; returns the PIDs.  Pass ``popen`` when ``pid`` is our own child: it is then
    reaped through it, so that its exit code is kept (psutil would reap it and lose the code)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    others = procs[1:] if popen is not None else procs

    def wait(timeout: float) -> list[psutil.Process]:
        t0 = time.monotonic()
        alive = []
        if popen is not None:
            try:
                popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                alive.append(root)
        _, rest = psutil.wait_procs(others, timeout=max(0.0, timeout - (time.monotonic() - t0)))
        return alive + rest

    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    for p in wait(grace):
        with contextlib.suppress(psutil.Error):
            p.kill()
    wait(grace)
    return [p.pid for p in procs]


def tree_alive(pids: Sequence[int]) -> bool:
    """Whether any of ``pids`` still runs (a zombie awaiting its parent counts as ended)."""
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            continue
    return False
