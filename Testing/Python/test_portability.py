"""Windows (and non-UTF-8 locale) behaviour, simulated on the machine the tests run on.

* ``os.open`` of a file read or written as bytes passes ``O_BINARY`` (Windows opens in text mode
  without it: reads drop the CR of every CR LF and stop at 0x1A, so an ONNX export never matches
  its own checksum);
* text files are read and written as UTF-8 whatever the locale (cp1252 on a Windows CLI);
* the ONNX cache's signing key is trusted on Windows, whose ``fstat`` reports mode 0o666;
* without ``fcntl`` the folder, batch and activation locks still exclude each other;
* a feedback database on a UNC path gets a URI SQLite opens;
* volumes named like Windows devices (``CON``, ``nul``, ``COM1``) give file names that are files.
"""
from __future__ import annotations

import ast
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import types
from pathlib import Path, PurePosixPath, PureWindowsPath

import filelock  # noqa: F401 -- imported while fcntl is there, as it is on every platform that has it
import pytest

from LesionSegLib.engine.errors import InputError

REPO = Path(__file__).resolve().parents[2]
PRODUCT = [REPO / "LesionSeg", REPO / "LesionSegTraining"]
O_BINARY = 1 << 30  # a flag Linux does not use: what Windows' os.O_BINARY stands for here


class _WindowsOS(types.ModuleType):
    """``os`` for one engine module, as Windows Python has it: ``O_BINARY``, and opens recorded."""

    O_BINARY = O_BINARY

    def __init__(self, name: str = "posix", mode: int | None = None, hide=()):
        super().__init__("os")
        self.opened: list[tuple[str, int]] = []
        self._name, self._mode, self._hide = name, mode, set(hide)

    def __getattr__(self, attr):
        if attr in self._hide:
            raise AttributeError(attr)
        return self._name if attr == "name" else getattr(os, attr)

    def open(self, path, flags, *args, **kwargs):
        self.opened.append((Path(path).name, flags))
        return os.open(path, flags & ~O_BINARY, *args, **kwargs)

    def fstat(self, fd):
        st = os.fstat(fd)
        if self._mode is None:
            return st
        return os.stat_result((st.st_mode & ~0o7777 | self._mode, *tuple(st)[1:]))


@pytest.fixture()
def user_models(tmp_path, monkeypatch):
    monkeypatch.setenv("LESIONSEG_MODELS", str(tmp_path / "models"))
    return tmp_path / "models"


# ------------------------------------------------------------------ 1. O_BINARY
def test_onnx_cache_and_key_are_opened_binary(user_models, monkeypatch):
    import torch

    from LesionSegLib.engine.models import get_card, read_card
    from LesionSegLib.engine.runtime import export

    folder = user_models / "copy"
    shutil.copytree(get_card("sts-clcs").folder, folder, ignore=shutil.ignore_patterns(".onnx-cache"))
    card = read_card(folder)
    shim = _WindowsOS()
    monkeypatch.setattr(export, "os", shim)

    def build():
        return torch.nn.Linear(4, 2).eval(), (torch.zeros(1, 4),), ["x"], ["y"], {}

    spec = {"x": [1, 4]}
    data, notes = export.cached_onnx(card, "classifier", spec, build)
    again, notes2 = export.cached_onnx(card, "classifier", spec, lambda: pytest.fail("exported again"))
    assert again == data and notes == notes2  # the signed cache is trusted the second time
    assert not any("refused" in n for n in notes2)
    names = {name for name, _ in shim.opened}
    assert export.KEY_FILE in names and any(n.endswith(".onnx") for n in names)
    assert [(n, f) for n, f in shim.opened if not f & O_BINARY] == []  # every one binary


# ------------------------------------------------------------------ 4. UTF-8 text files
def _mode(call: ast.Call, position: int) -> str | None:
    for kw in call.keywords:
        if kw.arg == "mode":
            return kw.value.value if isinstance(kw.value, ast.Constant) else None
    if len(call.args) > position:
        arg = call.args[position]
        return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None
    return "r"


def _text_io_without_encoding(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call) or any(kw.arg == "encoding" for kw in node.keywords):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id == "open":
            mode = _mode(node, 1)
        elif isinstance(f, ast.Attribute) and f.attr == "fdopen":
            mode = _mode(node, 1)
        elif isinstance(f, ast.Attribute) and f.attr == "open" and not (isinstance(f.value, ast.Name) and f.value.id == "os"):
            mode = _mode(node, 0)  # Path.open, io.open
        elif isinstance(f, ast.Attribute) and f.attr in ("read_text", "write_text"):
            mode = "r"
        else:
            continue
        if mode is None or "b" not in mode:  # a mode not spelled out counts as text
            out.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)[:100]}")
    return out


def test_product_text_io_names_its_encoding():
    """Without ``encoding=`` Python uses the locale's (cp1252 on a Windows CLI): a lesion named
    '病灶' fails the export, 'Läsion' is written as bytes UTF-8 readers cannot read."""
    files = [p for root in PRODUCT for p in sorted(root.rglob("*.py")) if "__pycache__" not in p.parts]
    assert len(files) > 50
    assert [hit for p in files for hit in _text_io_without_encoding(p)] == []


def test_lesion_csv_is_utf8_under_an_ascii_locale(tmp_path):
    """The CLI's lesion CSV, and its reading back, under a locale whose encoding is ASCII."""
    out = tmp_path / "case_lesions.csv"
    code = ("import sys\nfrom LesionSegLib.engine.io.writers import write_csv\n"
            "from LesionSegLib.engine.evaluate.pairing import read_table\n"
            "write_csv([{'lesion_id': 1, 'name': 'L\\u00e4sion \\u75c5\\u7076', 'confidence': 0.5, 'mean_probability': 0.25}],"
            " ['lesion_id', 'name', 'confidence', 'mean_probability'], sys.argv[1])\n"
            "print(read_table(__import__('pathlib').Path(sys.argv[1])))\n")
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", PYTHONIOENCODING="utf-8")
    run = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert out.read_bytes().decode("utf-8").splitlines()[1] == "1,L\u00e4sion \u75c5\u7076,0.5,0.25"
    assert "{1: {'confidence': 0.5, 'mean_probability': 0.25}}" in run.stdout


# ------------------------------------------------------------------ 5. the signing key on Windows
@pytest.mark.parametrize("name,mode,hide,trusted", [
    ("nt", 0o666, ("getuid",), True),      # Windows: no mode bits (fstat says 0o666), the profile's ACLs decide
    ("posix", 0o666, (), False),           # POSIX: a key others can read is refused, as before
    ("posix", 0o600, (), True),
])
def test_signing_key_mode_check_on_windows(user_models, monkeypatch, name, mode, hide, trusted):
    from LesionSegLib.engine.runtime import export

    monkeypatch.setattr(export, "os", _WindowsOS(name, mode, hide))
    key = export._key()
    assert (key is not None) == trusted and (key is None or len(key) == 32)


def test_signing_key_other_checks_still_apply_on_windows(user_models, monkeypatch):
    from LesionSegLib.engine.runtime import export

    assert export._key() is not None  # made here (0600)
    shim = _WindowsOS("nt", 0o666)
    monkeypatch.setattr(shim, "getuid", lambda: os.getuid() + 1, raising=False)  # another user's key
    monkeypatch.setattr(export, "os", shim)
    assert export._key() is None
    monkeypatch.setattr(export, "os", _WindowsOS("nt", 0o666, ("getuid",)))
    (user_models / export.KEY_FILE).write_bytes(b"x" * 31)  # not 32 bytes
    assert export._key(create=False) is None


# ------------------------------------------------------------------ 6. locks without fcntl
@pytest.fixture()
def no_fcntl(monkeypatch):
    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError, as on Windows


def _take_turns(hold) -> None:
    """Two threads enter ``hold()``: the second gets in only after the first left."""
    events, inside = [], threading.Event()

    def first():
        with hold():
            events.append("first in")
            inside.set()
            time.sleep(0.4)
            events.append("first out")

    def second():
        inside.wait(10)
        with hold():
            events.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert events == ["first in", "first out", "second in"]


def test_folder_lock_without_fcntl(tmp_path, no_fcntl):
    from LesionSegLib.engine.atomic import folder_lock

    _take_turns(lambda: folder_lock(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] in ([], [".lesionseg.lock"])  # Windows removes it on release


def test_activation_lock_without_fcntl(user_models, no_fcntl):
    from LesionSegLib.engine.learn import versions

    _take_turns(versions._locked)


def test_batch_lock_without_fcntl(tmp_path, no_fcntl):
    from LesionSegLib.engine.batch.cases import lock_outdir

    with lock_outdir(tmp_path):
        with pytest.raises(InputError, match="another `lesionseg batch` is writing into this folder"):
            with lock_outdir(tmp_path):
                pass
    with lock_outdir(tmp_path):  # released: the next batch gets it
        pass


def test_lock_without_filelock_runs_unlocked(tmp_path, no_fcntl, monkeypatch):
    from LesionSegLib.engine import locking

    monkeypatch.setitem(sys.modules, "filelock", None)
    with locking.lock_file(tmp_path / "x.lock") as held, locking.lock_file(tmp_path / "x.lock", wait=False) as again:
        assert (held, again) == (False, False)


# ------------------------------------------------------------------ 8. UNC paths in SQLite URIs
def test_unc_feedback_database_uri(tmp_path):
    from LesionSegLib.engine.feedback import schema

    unc = PureWindowsPath(r"\\fileserver\home$\zoe\Slicer\feedback.db")
    assert schema.file_uri(unc) == "file:////fileserver/home%24/zoe/Slicer/feedback.db"  # empty authority
    assert schema.file_uri(PureWindowsPath(r"C:\Users\zoë\a b#.db")) == "file:///C:/Users/zo%C3%AB/a%20b%23.db"
    assert schema.file_uri(PurePosixPath("/srv/a b#.db")) == "file:///srv/a%20b%23.db"
    # SQLite opens the empty-authority form (here the POSIX path //tmp/... is /tmp/...) and
    # refuses the form as_uri gives for a UNC path
    db = tmp_path / "feedback #1.db"
    sqlite3.connect(db).execute("create table t (x)").connection.commit()
    empty_authority = "file:////" + PurePosixPath(db).as_uri()[len("file:///"):]
    assert sqlite3.connect(empty_authority + "?mode=ro", uri=True).execute("select count(*) from t").fetchone() == (0,)
    assert sqlite3.connect(schema.read_uri(db), uri=True).execute("select count(*) from t").fetchone() == (0,)
    with pytest.raises(sqlite3.OperationalError, match="authority"):
        sqlite3.connect("file://fileserver" + PurePosixPath(db).as_uri()[len("file://"):] + "?mode=ro", uri=True)


# ------------------------------------------------------------------ 9. Windows device names
@pytest.mark.parametrize("stem,safe", [
    ("CON", "CON_"), ("nul", "nul_"), ("Aux", "Aux_"), ("prn", "prn_"), ("COM1", "COM1_"), ("lpt9", "lpt9_"),
    ("con.nii.gz", "con_.nii.gz"), ("COM\u00b9", "COM\u00b9_"),
    ("CONSOLE", "CONSOLE"), ("COM0", "COM0"), ("COM10", "COM10"), ("aux_", "aux_"), ("case1", "case1"), ("nul_1", "nul_1"),
])
def test_windows_device_names_are_made_files(stem, safe):
    from LesionSegLib import export, runner

    if "." not in stem:
        assert runner._safe_stem(stem) == safe  # the runner's temporary input <stem>.nrrd
        assert export._stem(stem) == safe  # the exported <stem>.seg.nrrd, <stem>.csv ...
    from LesionSegLib.engine.io.images import windows_safe

    assert windows_safe(stem) == safe
