"""The Slicer dependency installer (``LesionSegLib/dependencies.py``) against fakes of Slicer's
installation APIs: ``slicer.util.pip_install``, ``slicer.packaging.pip_ensure``, the PyTorch
extension's ``PyTorchUtils`` and the extensions manager; plus the panel's install flow.

The requirements come from the one list (``requirements.txt``) that ``pyproject.toml`` reads;
versions are read from the installed distributions' metadata, so the fakes below change what
``importlib.metadata.version`` reports.
"""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import types

import pytest

from slicer_app_shim import REPO, slicer_app  # noqa: F401 (fixture)


@pytest.fixture
def deps(slicer_app, monkeypatch):
    """The installer with a controllable set of installed versions and recording fakes."""
    import slicer

    from LesionSegLib import dependencies, settings

    slicer_app.reset()
    real_version = importlib.metadata.version
    installed: dict[str, str | None] = {}
    calls: list = []

    def version(name):
        key = name.lower()
        if key in installed:
            if installed[key] is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return installed[key]
        return real_version(name)

    def pip_install(reqs):
        calls.append(("pip_install", list(reqs) if not isinstance(reqs, str) else reqs))
        for r in reqs:
            req = dependencies.Requirement(r)
            installed[req.name.lower()] = _fitting(req)

    monkeypatch.setattr(dependencies.importlib.metadata, "version", version)
    monkeypatch.setattr(slicer.util, "pip_install", pip_install)
    monkeypatch.delattr(slicer, "packaging", raising=False)
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)
    monkeypatch.setitem(sys.modules, "slicer.pydeps", None)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # no PyTorch extension unless a test adds one
    # a fresh Slicer process: nothing of ours imported yet (this test process imports torch and
    # MONAI in other tests); test_upgrade_of_an_imported_package_asks_for_a_restart sets its own
    real_imported = dependencies._imported
    monkeypatch.setattr(dependencies, "_imported", lambda names: [])
    yield types.SimpleNamespace(real_imported=real_imported, d=dependencies, settings=settings, installed=installed, calls=calls,
                                slicer=slicer, monkeypatch=monkeypatch)
    slicer_app.reset()


def _fitting(req) -> str:
    """A version inside ``req``'s specifier (its floor)."""
    for s in req.specifier:
        if s.operator in (">=", "==", "~="):
            return s.version
    return "1.0"


def _fake_pytorch_utils(deps, fail=None):
    """PyTorchUtils as the extension has it: ``installTorch`` runs ``ltt install torch<spec>``, which
    replaces a torch that does not fit in place; ``fail`` (an exception) models an offline pip."""

    class Logic:
        def torchInstalled(self):
            return deps.installed.get("torch") is not None

        def uninstallTorch(self):
            deps.calls.append(("uninstallTorch",))
            deps.installed["torch"] = None

        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None, torchvisionVersionRequirement=None):
            deps.calls.append(("installTorch", askConfirmation, torchVersionRequirement))
            if fail is not None:
                raise fail  # pip failed before touching the installed torch
            deps.installed["torch"] = torchVersionRequirement.split(",")[0].lstrip(">=")
            return types.SimpleNamespace(__version__=deps.installed["torch"])

    deps.monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=Logic))


# ------------------------------------------------------------------------- the one list
def test_requirements_come_from_the_one_list(deps, tmp_path):
    lines = [ln.split("#")[0].strip() for ln in (REPO / "LesionSeg" / "LesionSegLib" / "requirements.txt").read_text(encoding="utf-8").splitlines()]
    listed = {str(deps.d.Requirement(ln)).split("[")[0] for ln in lines if ln}
    reqs = {r.name: r for r in deps.d.requirements()}
    assert {r.name for r in deps.d.requirements()} == {deps.d.Requirement(x).name for x in listed}
    assert "matplotlib" in reqs  # the Training panel's plot (R11)
    assert str(reqs["monai"].specifier) == str(deps.d.Requirement("monai>=1.6.1,<1.8").specifier)  # floor and ceiling
    assert str(deps.d.torch_requirement()) == "torch>=2.13.0"  # the pip pin becomes a floor for PyTorchUtils
    optional = {r.name for r in deps.d.requirements(optional=True)} - set(reqs)
    assert optional == {"highdicom", "pydicom"}
    # pyproject.toml reads the same files (dynamic dependencies and extras)
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert ('dependencies = { file = ["LesionSeg/LesionSegLib/requirements.txt", '
            '"LesionSeg/LesionSegLib/requirements-runtime.txt"] }') in pyproject
    # the fast runtimes are pip dependencies, but optional (best effort) in Slicer
    runtimes = {r.name for r in deps.d.load_requirements(deps.d.RUNTIME_REQUIREMENTS_FILE)}
    assert runtimes == {"openvino", "onnxruntime", "onnx"} and not runtimes & set(reqs)
    assert 'optional-dependencies.dicom = { file = ["LesionSeg/LesionSegLib/requirements-dicom.txt"] }' in pyproject
    assert "trame-slicer[standalone]==2.0.0" in (REPO / "Testing" / "requirements-test.txt").read_text(encoding="utf-8")
    bad = tmp_path / "requirements.txt"
    bad.write_text("# comment\nmonai>=>1\n")
    with pytest.raises(ValueError, match=r"requirements.txt:2: bad requirement"):
        deps.d.load_requirements(bad)


def test_versions_not_only_presence(deps):
    assert deps.d.check() == []  # this environment meets every requirement
    deps.installed.update({"torch": "1.13.1", "monai": "1.4.0", "connected-components-3d": None, "scipy": "2.1.0"})
    problems = {p.name: p for p in deps.d.check()}
    assert set(problems) == {"torch", "monai", "connected-components-3d", "scipy"}
    assert str(problems["torch"]) == "torch>=2.13.0 (1.13.1 installed)"
    assert str(problems["connected-components-3d"]).endswith("(not installed)")
    assert problems["scipy"].installed == "2.1.0"  # above the ceiling <2
    deps.installed.update({"torch": "2.13.0+cpu"})  # a local build label still meets the floor
    assert "torch" not in {p.name for p in deps.d.check()}
    deps.installed.update({"highdicom": None})
    assert [p.name for p in deps.d.check(optional=True) if p.optional] == ["highdicom"]


# --------------------------------------------------------------------------- installing
def test_install_with_pytorchutils_and_pip_install(deps):
    _fake_pytorch_utils(deps)
    deps.installed.update({"torch": "1.13.1", "monai": "1.4.0", "connected-components-3d": None})
    # a fresh Slicer process: none of them imported yet (in the test process, other tests import torch)
    deps.monkeypatch.setattr(deps.d, "_imported", lambda names: [])
    result = deps.d.install(deps.d.check())
    assert not result.restart_required and result.message.startswith("installed")
    assert ("uninstallTorch",) not in deps.calls  # installTorch replaces the old torch in place
    assert ("installTorch", False, ">=2.13.0") in deps.calls
    pip = [c for c in deps.calls if c[0] == "pip_install"]
    assert pip == [("pip_install", ["monai<1.8,>=1.6.1", "connected-components-3d<5,>=4.1"])]
    assert deps.d.check() == []


def test_install_prefers_pip_ensure(deps):
    ensured = []

    def pip_ensure(requirements, constraints=None, skip_packages=None, prompt_install=True, prompt_restart=True,
                   requester=None, skip_in_testing=True, show_progress=True):
        ensured.append(([str(r) for r in requirements], prompt_install, requester))
        for r in requirements:
            deps.installed[r.name.lower()] = _fitting(r)

    deps.monkeypatch.setattr(deps.slicer, "packaging", types.SimpleNamespace(pip_ensure=pip_ensure), raising=False)
    deps.installed.update({"slicerio": "1.1.0"})
    deps.d.install(deps.d.check())
    assert ensured == [(["slicerio<2,>=1.4"], False, "LesionSeg")]  # we asked already: no second prompt
    assert not [c for c in deps.calls if c[0] == "pip_install"]


def test_pytorch_extension_missing_restart_marker_and_resume(deps):
    """No PyTorch extension: it is installed from the extension server, the pending-install
    marker survives the restart, and the module finishes the installation afterwards."""

    class Manager:
        installed = False

        def isExtensionInstalled(self, name):
            return self.installed

        def installExtensionFromServer(self, name, restart=True, update=False):
            deps.calls.append(("extension", name, restart))
            self.installed = True
            return True

    deps.slicer.app.extensionsManager = Manager()
    deps.installed.update({"torch": None, "monai": None})
    result = deps.d.install(deps.d.check())
    assert result.restart_required and "restart" in result.message
    assert ("extension", "PyTorch", False) in deps.calls
    assert not [c for c in deps.calls if c[0] == "pip_install"]  # nothing else before the restart
    pending = deps.settings.pending_install()
    assert pending and "torch>=2.13.0" in pending["requirements"]
    assert deps.d.resume_pending() is None  # before the restart PyTorchUtils cannot be imported

    # "after the restart": the extension is importable, the panel continues
    deps.monkeypatch.setitem(sys.modules, "PyTorchUtils", None)
    _fake_pytorch_utils(deps)
    deps.monkeypatch.setattr(deps.d.importlib.util, "find_spec", lambda name, *a: object() if name == "PyTorchUtils" else None)
    assert deps.d.resume_pending() == pending
    result = deps.d.install(deps.d.check())
    assert not result.restart_required
    assert deps.settings.pending_install() is None  # the marker is gone once all is installed


def test_no_extensions_manager_and_failures_name_the_problem(deps):
    deps.installed.update({"torch": None})
    with pytest.raises(RuntimeError, match="Install the 'PyTorch' extension"):
        deps.d.install(deps.d.check())
    _fake_pytorch_utils(deps)
    deps.installed.update({"torch": "2.13.0", "monai": "1.4.0"})
    deps.monkeypatch.setattr(deps.slicer.util, "pip_install", lambda reqs: deps.calls.append(("pip_install", reqs)))  # installs nothing
    with pytest.raises(RuntimeError, match=r"still do not fit.*monai"):
        deps.d.install(deps.d.check())


def test_upgrade_of_an_imported_package_asks_for_a_restart(deps):
    deps.installed.update({"scipy": "1.10.0"})  # scipy is imported in this process already
    import scipy  # noqa: F401

    deps.monkeypatch.setattr(deps.d, "_imported", deps.real_imported)
    result = deps.d.install(deps.d.check())
    assert result.restart_required and "scipy" in result.message


def test_self_test_never_installs(deps):
    deps.installed.update({"monai": "1.4.0"})
    with deps.d.self_test():
        with pytest.raises(deps.d.InstallRefused, match="never installs"):
            deps.d.install(deps.d.check())
    assert deps.calls == []


# ------------------------------------------------------------------------------- CUDA
def test_cuda_probe_never_imports_torch():
    code = ("import sys; sys.path.insert(0, {lib!r}); from LesionSegLib import dependencies as d; "
            "ok, msg = d.cuda_status(); print(repr((ok, msg, 'torch' in sys.modules, d.torch_build(), d.cuda_driver_devices())))")
    out = subprocess.run([sys.executable, "-c", code.format(lib=str(REPO / "LesionSeg"))], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ok, message, torch_imported, build, devices = eval(out.stdout.strip())
    assert torch_imported is False
    version = importlib.metadata.version("torch")
    assert build[0] == version
    if "+cpu" in version:  # this machine's CPU-only build
        assert (ok, build[1]) == (False, "cpu") and "CPU-only PyTorch build" in message
    if devices is None:
        assert ok is False


def test_cuda_messages(deps):
    deps.monkeypatch.delitem(sys.modules, "torch", raising=False)
    deps.monkeypatch.setattr(deps.d, "torch_build", lambda: ("2.13.0+cu128", "cuda"))
    deps.monkeypatch.setattr(deps.d, "cuda_driver_devices", lambda: 2)
    assert deps.d.cuda_status() == (True, "CUDA driver found (2 GPU(s)); 'auto' uses the GPU (torch 2.13.0+cu128).")
    deps.monkeypatch.setattr(deps.d, "cuda_driver_devices", lambda: None)
    ok, message = deps.d.cuda_status()
    assert not ok and "no CUDA GPU/driver found" in message
    deps.monkeypatch.setattr(deps.d, "torch_build", lambda: (None, "unknown"))
    assert deps.d.cuda_status() == (False, "PyTorch is not installed yet: it will be installed when you press Segment.")


# ------------------------------------------------------------------------- the panel
def test_panel_install_flow(deps):
    """Missing packages: the widget asks (confirmOkCancelDisplay), installs, and refreshes; a
    refusal installs nothing; the restart-required path offers the restart."""
    import os

    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    import qt_harness

    qt_harness.install()
    from test_slicer_widget import _import_module

    module = _import_module()
    w = module.LesionSegWidget()
    try:
        asked, restarts = [], []
        deps.monkeypatch.setattr(deps.slicer.util, "confirmOkCancelDisplay", lambda text, **kw: asked.append(text) or True)
        deps.monkeypatch.setattr(deps.slicer.util, "restart", lambda: restarts.append(1), raising=False)
        _fake_pytorch_utils(deps)
        deps.installed.update({"monai": "1.4.0", "connected-components-3d": None})
        assert w.installer.ensure() is True
        assert "monai<1.8,>=1.6.1 (1.4.0 installed)" in asked[0] and "connected-components-3d" in asked[0]
        assert "installing: monai" in w.ui.logTextEdit.toPlainText()

        deps.calls.clear()
        deps.installed.update({"monai": "1.4.0"})
        deps.monkeypatch.setattr(deps.slicer.util, "confirmOkCancelDisplay", lambda text, **kw: False)
        assert w.installer.ensure() is False and deps.calls == []
        assert "Segmentation needs monai" in w.ui.statusLabel.text()

        # the PyTorch extension is missing: installed, then Slicer must restart
        deps.monkeypatch.setitem(sys.modules, "PyTorchUtils", None)
        deps.installed.update({"torch": None, "monai": "1.6.1"})
        deps.slicer.app.extensionsManager = types.SimpleNamespace(isExtensionInstalled=lambda n: False,
                                                                   installExtensionFromServer=lambda n, r=True, u=False: True)
        deps.monkeypatch.setattr(deps.slicer.util, "confirmOkCancelDisplay", lambda text, **kw: True)
        assert w.installer.ensure() is False
        assert restarts == [1] and "Restart Slicer" in w.ui.statusLabel.text()
        assert deps.settings.pending_install() is not None
    finally:
        w.cleanup()
        w.parent.close()


# ------------------------------------------------- the installer's audit (D1-D5)
@pytest.fixture
def panel(deps):
    """The panel's DependencyInstaller with recording stand-ins: its log box, status label, the
    dialogs (``answers`` pops the replies, yes by default) and the restart."""
    import os

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import qt_harness

    qt_harness.install()
    from LesionSegLib.widget_support import DependencyInstaller

    ns = types.SimpleNamespace(asked=[], answers=[], restarts=[], errors=[], status=[])

    def confirm(text, **kw):
        ns.asked.append(text)
        return ns.answers.pop(0) if ns.answers else True

    deps.monkeypatch.setattr(deps.slicer.util, "confirmOkCancelDisplay", confirm)
    deps.monkeypatch.setattr(deps.slicer.util, "restart", lambda: ns.restarts.append(1), raising=False)
    for r in deps.d.load_requirements(deps.d.RUNTIME_REQUIREMENTS_FILE):  # the runtimes fit unless a test says not
        deps.installed[r.name.lower()] = _fitting(r)
    log_box = types.SimpleNamespace(append=lambda text, stamp=False: None, show_error=lambda summary, *a, **k: ns.errors.append(summary))
    label = types.SimpleNamespace(setText=ns.status.append)
    ns.new = lambda: DependencyInstaller(log_box, label)  # the panel of a new Slicer session
    return ns


RUNTIMES = ["openvino<2027,>=2026.4", "onnxruntime<2,>=1.32", "onnx<2,>=1.23"]


def test_failed_torch_upgrade_keeps_the_old_torch(deps):
    """D1: offline, the new torch cannot be installed: the older torch (another extension's) stays."""
    deps.installed.update({"torch": "2.5.1"})
    _fake_pytorch_utils(deps, fail=subprocess.CalledProcessError(1, ["light_the_torch", "install"]))
    with pytest.raises(RuntimeError, match=r"torch>=2\.13\.0\) could not be installed.*torch 2\.5\.1 is still installed"):
        deps.d.install(deps.d.check())
    assert deps.calls == [("installTorch", False, ">=2.13.0")]  # never uninstallTorch, nothing after the failure
    assert deps.installed["torch"] == "2.5.1"
    # a PyTorchUtils that returns None (nothing installed) is a failure too
    logic = types.SimpleNamespace(installTorch=lambda **kw: None, uninstallTorch=lambda: deps.installed.update(torch=None))
    deps.monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=lambda: logic))
    with pytest.raises(RuntimeError, match="torch 2.5.1 is still installed"):
        deps.d.install(deps.d.check())
    assert deps.installed["torch"] == "2.5.1"


def test_fast_runtimes_only_after_a_yes(deps, panel):
    """D2: the runtimes are asked about in a question of their own; "no" installs none of them."""
    _fake_pytorch_utils(deps)
    deps.installed.update({"monai": "1.4.0", "openvino": None, "onnxruntime": None, "onnx": None})
    deps.d.install(deps.d.check())  # what check() lists, nothing more
    assert deps.calls == [("pip_install", ["monai<1.8,>=1.6.1"])]
    assert {p.name for p in deps.d.runtime_problems()} == {"openvino", "onnxruntime", "onnx"}

    deps.calls.clear()
    deps.installed["monai"] = "1.4.0"
    panel.answers[:] = [True, False]  # yes to the required packages, no to the optional runtimes
    assert panel.new().ensure() is True
    assert len(panel.asked) == 2 and "monai" in panel.asked[0] and "openvino" not in panel.asked[0]
    assert panel.asked[1].startswith("Optional") and all(n in panel.asked[1] for n in RUNTIMES)
    assert deps.calls == [("pip_install", ["monai<1.8,>=1.6.1"])]
    panel.asked.clear()
    assert panel.new().ensure() is True and panel.asked == []  # the "no" is remembered
    deps.settings.user_settings().remove(deps.d.DECLINED_RUNTIMES_KEY)
    assert panel.new().ensure() is True  # asked, "yes": installed
    assert len(panel.asked) == 1 and "openvino" in panel.asked[0]
    assert deps.calls[-1] == ("pip_install", RUNTIMES) and deps.d.runtime_problems() == []


def test_restart_path_installs_or_offers_the_runtimes(deps, panel):
    """D3: an upgrade that needs a restart still installs the confirmed runtimes, and the panel
    offers runtimes that are missing after the restart (check() itself is then empty)."""
    deps.monkeypatch.setattr(deps.d, "_imported", lambda names: list(names))  # scipy imported in Slicer already
    deps.installed.update({"scipy": "1.10.0", "openvino": None, "onnxruntime": None, "onnx": None})
    assert panel.new().ensure() is False
    assert panel.restarts == [1] and len(panel.asked) == 3  # the packages, the runtimes, the restart
    assert deps.calls == [("pip_install", ["scipy<2,>=1.14"]), ("pip_install", RUNTIMES)]
    assert deps.d.runtime_problems() == []

    deps.monkeypatch.setattr(deps.d, "_imported", lambda names: [])  # after the restart
    deps.installed["openvino"] = None  # e.g. its download had failed
    deps.calls.clear()
    panel.asked.clear()
    assert deps.d.check() == []
    assert panel.new().ensure() is True
    assert len(panel.asked) == 1 and "openvino" in panel.asked[0]
    assert deps.calls == [("pip_install", ["openvino<2027,>=2026.4"])]


def test_pytorch_extension_installed_but_not_loadable(deps, panel):
    """D4: the extension is installed but PyTorchUtils cannot be imported: say so, no restart loop."""
    class Manager:
        def isExtensionInstalled(self, name):
            return True

        def installExtensionFromServer(self, *a):
            raise AssertionError("already installed")

    deps.slicer.app.extensionsManager = Manager()
    deps.installed.update({"torch": None})
    for _ in range(2):
        with pytest.raises(RuntimeError, match="installed but cannot be loaded.*Extensions Manager"):
            deps.d.install(deps.d.check())
    assert deps.settings.pending_install() is None
    deps.settings.set_pending_install(["torch>=2.13.0"], "an earlier Slicer process installed it")  # the restart happened
    Manager.isExtensionEnabled = lambda self, name: False
    with pytest.raises(RuntimeError, match="'PyTorch' extension is disabled"):
        deps.d.install(deps.d.check())
    assert panel.new().ensure() is False
    assert panel.restarts == [] and len(panel.asked) == 1 and "cannot be imported" in panel.errors[0]
    # installed by this very Slicer process, restart declined: the restart is still what it needs
    del Manager.isExtensionEnabled
    deps.d._write_pending(deps.d.check(), [], "the 'PyTorch' extension was installed")
    assert deps.d.install(deps.d.check()).restart_required


def test_resume_asks_about_more_than_was_confirmed(deps, panel):
    """D5: the marker holds what the user confirmed; after the restart anything more is asked about."""
    import json

    class Manager:
        installed = False

        def isExtensionInstalled(self, name):
            return self.installed

        def installExtensionFromServer(self, name, restart=True, update=False):
            self.installed = True
            return True

    deps.slicer.app.extensionsManager = Manager()
    deps.installed.update({"torch": None, "openvino": None})
    panel.answers[:] = [True, True, False]  # the packages, the runtime, not restarting now
    assert panel.new().ensure() is False
    pending = deps.settings.pending_install()
    assert pending["requirements"] == ["torch>=2.13.0"] and pending["runtimes"] == ["openvino<2027,>=2026.4"]
    assert deps.calls == []

    # the restart: PyTorchUtils can be imported; meanwhile another extension downgraded scikit-learn
    _fake_pytorch_utils(deps)
    real_find_spec = deps.d.importlib.util.find_spec
    deps.monkeypatch.setattr(deps.d.importlib.util, "find_spec", lambda name, *a: object() if name == "PyTorchUtils" else real_find_spec(name, *a))
    deps.installed["scikit-learn"] = "1.2.0"
    panel.asked.clear()
    panel.answers[:] = [False]
    assert panel.new().resume() is False
    assert len(panel.asked) == 1 and "scikit-learn" in panel.asked[0].split("Since the restart")[1]
    assert deps.calls == [] and deps.settings.pending_install() is None

    def restarted():
        deps.settings.user_settings().setValue(deps.settings.PENDING_INSTALL_KEY, json.dumps(pending))
        panel.asked.clear()
        deps.calls.clear()

    restarted()
    assert panel.new().resume() is True  # "yes": all of it, and the confirmed runtime without a question
    assert len(panel.asked) == 1
    assert deps.calls == [("installTorch", False, ">=2.13.0"), ("pip_install", ["scikit-learn<2,>=1.6"]),
                          ("pip_install", ["openvino<2027,>=2026.4"])]
    assert deps.settings.pending_install() is None
    deps.installed.update({"torch": None, "openvino": None})
    restarted()
    assert panel.new().resume() is True and panel.asked == []  # nothing beyond the marker: no question
    assert deps.calls == [("installTorch", False, ">=2.13.0"), ("pip_install", ["openvino<2027,>=2026.4"])]


def test_intel_macos_is_refused_before_a_download_that_cannot_succeed(deps):
    """Slicer for macOS may run as an Intel build, and PyTorch has no Intel-macOS build after 2.2.2:
    the installer asked PyTorchUtils for torch>=2.13 and failed with "could not be installed"."""
    import platform

    deps.installed.update({"torch": None})
    _fake_pytorch_utils(deps)
    deps.monkeypatch.setattr(sys, "platform", "darwin")
    deps.monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    with pytest.raises(RuntimeError, match=r"no build for Intel macOS.*Slicer on Windows or Linux"):
        deps.d.install(deps.d.check())
    assert deps.calls == []  # nothing was downloaded or installed
    runtimes = deps.d.load_requirements(deps.d.RUNTIME_REQUIREMENTS_FILE)
    assert runtimes and all(not r.marker.evaluate({"sys_platform": "darwin", "platform_machine": "x86_64"}) and
                            r.marker.evaluate({"sys_platform": "win32", "platform_machine": "AMD64"}) for r in runtimes)
