"""The engine's Python packages inside Slicer: check their versions, install what is missing,
and say whether CUDA can be used, all without importing torch into Slicer's process.

* The requirements, with their floors and ceilings, are read from ``requirements.txt`` beside this
  file: the ONE list, which ``pyproject.toml`` reads too (dynamic dependencies).  The optional
  DICOM SEG export packages are in ``requirements-dicom.txt`` (the ``dicom`` extra).
* :func:`check` compares each requirement with the *installed version* (``importlib.metadata``:
  nothing is imported), so a torch 1.x or a MONAI without the calibration API left by another
  extension is reported, not accepted.
* :func:`install` installs torch through the PyTorch extension's ``PyTorchUtils`` (it picks the
  CUDA/CPU build that fits the computer; the ``torch==X`` pin of the list becomes ``torch>=X``
  here).  When that extension itself is missing it is installed from the extension server and a
  pending-install marker is written to the settings (``settings.PENDING_INSTALL_KEY``): Slicer
  must restart before ``PyTorchUtils`` can be imported, and the module finishes the installation
  after the restart (:func:`resume_pending`).  Everything else goes through
  ``slicer.packaging``/``slicer.pydeps`` ``pip_ensure`` where this Slicer has it, else
  ``slicer.util.pip_install``.  An upgrade of a package Slicer had already imported asks for a
  restart too.
* Nothing is ever installed while a module self-test runs (:func:`self_test` context): the test
  skips with the reason instead.
* :func:`cuda_status` asks the CUDA driver (``cuInit``/``cuDeviceGetCount`` through ctypes) and
  reads the torch build from its metadata; torch is only consulted when it is already imported.

No Qt here.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from . import settings

log = logging.getLogger("LesionSeg")

HERE = Path(__file__).resolve().parent
REQUIREMENTS_FILE = HERE / "requirements.txt"
OPTIONAL_REQUIREMENTS_FILE = HERE / "requirements-dicom.txt"
#: fast CPU runtimes for the networks (engine/runtime): installed best-effort after the required
#: packages; without them segmentation runs on PyTorch, so they never block the module
RUNTIME_REQUIREMENTS_FILE = HERE / "requirements-runtime.txt"
PYTORCH_EXTENSION = "PyTorch"

_SELF_TEST = False


class InstallRefused(RuntimeError):
    """An installation was asked for while a module self-test runs."""


@contextlib.contextmanager
def self_test():
    """While this block runs, :func:`install` refuses (self-tests never change the environment)."""
    global _SELF_TEST
    was, _SELF_TEST = _SELF_TEST, True
    try:
        yield
    finally:
        _SELF_TEST = was


# ----------------------------------------------------------------------------- the list
def load_requirements(path) -> list[Requirement]:
    """Requirements of a pip requirements file (comments, blank lines and ``-`` options skipped)."""
    out = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        try:
            out.append(Requirement(line))
        except InvalidRequirement as exc:
            raise ValueError(f"{path}:{number}: bad requirement {line!r}: {exc}") from None
    return out


def slicer_requirement(req: Requirement) -> Requirement:
    """The requirement as Slicer installs it: torch's exact pin becomes a floor (PyTorchUtils picks the build)."""
    if canonicalize_name(req.name) != "torch":
        return req
    pins = [s.version for s in req.specifier if s.operator in ("==", "===")]
    if not pins:
        return req
    rest = [str(s) for s in req.specifier if s.operator not in ("==", "===")]
    return Requirement("torch" + ",".join([f">={pins[0]}"] + rest))


def requirements(optional: bool = False) -> list[Requirement]:
    reqs = [slicer_requirement(r) for r in load_requirements(REQUIREMENTS_FILE)]
    if optional:
        reqs += load_requirements(OPTIONAL_REQUIREMENTS_FILE)
    return reqs


def torch_requirement() -> Requirement:
    return next(r for r in requirements() if canonicalize_name(r.name) == "torch")


# ---------------------------------------------------------------------------- checking
@dataclass(frozen=True)
class Problem:
    """A requirement that the installed packages do not meet."""

    requirement: Requirement
    installed: str | None  # installed version, None when absent
    optional: bool = False

    @property
    def name(self) -> str:
        return canonicalize_name(self.requirement.name)

    def __str__(self) -> str:
        have = "not installed" if self.installed is None else f"{self.installed} installed"
        return f"{self.requirement} ({have})"


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def satisfied(req: Requirement, version: str | None) -> bool:
    if version is None:
        return False
    try:
        return req.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def check(optional: bool = False) -> list[Problem]:
    """Requirements (and, with ``optional``, the optional ones) whose installed version does not fit."""
    importlib.invalidate_caches()
    required = requirements()
    problems = [Problem(r, installed_version(r.name)) for r in required]
    if optional:
        problems += [Problem(r, installed_version(r.name), True) for r in load_requirements(OPTIONAL_REQUIREMENTS_FILE)]
    return [p for p in problems if (p.requirement.marker is None or p.requirement.marker.evaluate())
            and not satisfied(p.requirement, p.installed)]


def describe(problems) -> str:
    return ", ".join(str(p) for p in problems)


# -------------------------------------------------------------------------- installing
@dataclass
class InstallResult:
    restart_required: bool = False
    message: str = ""


def _slicer():
    import slicer

    return slicer


def pip_ensure_function():
    """``pip_ensure`` of this Slicer (``slicer.packaging``, ``slicer.pydeps`` or ``slicer.util``), or None."""
    slicer = _slicer()
    for name in ("packaging", "pydeps", "util"):
        module = getattr(slicer, name, None)
        if module is None:
            try:
                module = importlib.import_module(f"slicer.{name}")
            except ImportError:
                continue
        fn = getattr(module, "pip_ensure", None)
        if callable(fn):
            return fn
    return None


def _call_supported(fn, *args, **kwargs):
    """Call ``fn`` with the keyword arguments its signature accepts (the API grew over Slicer versions)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(*args)
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return fn(*args, **kwargs)


def _imported(dist_names: list[str]) -> list[str]:
    """Which of these distributions have a module already imported in this process."""
    try:
        mapping = importlib.metadata.packages_distributions()
    except Exception:  # very old importlib.metadata
        return []
    wanted = {canonicalize_name(n) for n in dist_names}
    out = set()
    for module, dists in mapping.items():
        if module in sys.modules and any(canonicalize_name(d) in wanted for d in dists):
            out.update(canonicalize_name(d) for d in dists if canonicalize_name(d) in wanted)
    return sorted(out)


def _install_torch(problem: Problem) -> InstallResult | None:
    """torch through PyTorchUtils; an InstallResult when a restart must come first."""
    slicer = _slicer()
    try:
        import PyTorchUtils  # the "PyTorch" Slicer extension
    except ModuleNotFoundError:
        manager = getattr(getattr(slicer, "app", None), "extensionsManagerModel", lambda: None)()
        if manager is None:
            raise RuntimeError(f"LesionSeg needs PyTorch ({problem.requirement}). Install the '{PYTORCH_EXTENSION}' extension "
                               "from the Extensions Manager, restart Slicer, and press Segment again.") from None
        if not manager.isExtensionInstalled(PYTORCH_EXTENSION):
            if not manager.installExtensionFromServer(PYTORCH_EXTENSION, False):
                raise RuntimeError(f"The '{PYTORCH_EXTENSION}' extension could not be installed from the extension server; "
                                   "install it from the Extensions Manager, then restart Slicer.") from None
        reason = f"the '{PYTORCH_EXTENSION}' extension was installed; restart Slicer to finish installing LesionSeg's packages"
        settings.set_pending_install([str(r) for r in requirements()], reason)
        return InstallResult(True, reason)
    logic = PyTorchUtils.PyTorchUtilsLogic()
    if problem.installed is not None and hasattr(logic, "uninstallTorch"):
        logic.uninstallTorch()  # too old or too new: replace it with a fitting build
    torch = _call_supported(logic.installTorch, askConfirmation=False, torchVersionRequirement=str(problem.requirement.specifier))
    if torch is None:
        raise RuntimeError("PyTorch was not installed")
    return None


def install(problems, requester: str = "LesionSeg") -> InstallResult:
    """Install what ``problems`` (from :func:`check`) lists; the caller asked the user first.

    Returns whether Slicer must restart (the PyTorch extension was just installed, or a package
    that Slicer had imported was upgraded).  Raises ``RuntimeError`` naming what is still wrong.
    """
    if _SELF_TEST:
        raise InstallRefused("a module self-test never installs packages: " + describe(problems))
    slicer = _slicer()
    problems = list(problems)
    upgraded = [p.name for p in problems if p.installed is not None]
    torch = [p for p in problems if p.name == "torch"]
    if torch:
        pending = _install_torch(torch[0])
        if pending is not None:
            return pending
    rest = [p.requirement for p in problems if p.name != "torch"]
    if rest:
        log.info("installing %s", " ".join(str(r) for r in rest))
        ensure = pip_ensure_function()
        if ensure is not None:
            _call_supported(ensure, rest, prompt_install=False, prompt_restart=False, requester=requester)
        else:
            slicer.util.pip_install([str(r) for r in rest])
    importlib.invalidate_caches()
    names = {p.name for p in problems}
    still = [p for p in check(optional=any(p.optional for p in problems)) if p.name in names]
    stale = _imported(upgraded)
    if stale:
        return InstallResult(True, "restart Slicer to use the new versions of " + ", ".join(stale))
    if still:
        raise RuntimeError("these packages still do not fit after installation: " + describe(still))
    settings.clear_pending_install()
    install_runtimes()
    return InstallResult(False, "installed " + ", ".join(str(p.requirement) for p in problems))


def install_runtimes() -> list[str]:
    """Install the missing fast runtimes (OpenVINO, ONNX Runtime) best-effort; returns what is still
    missing.  A failure is logged, never raised: the engine then runs the networks on PyTorch."""
    missing = [r for r in load_requirements(RUNTIME_REQUIREMENTS_FILE)
               if installed_version(r.name) is None or not r.specifier.contains(installed_version(r.name), prereleases=True)]
    if missing and not _SELF_TEST:
        try:
            _slicer().util.pip_install([str(r) for r in missing])
            importlib.invalidate_caches()
        except Exception as exc:  # best effort: PyTorch remains the runtime
            log.warning("could not install the fast runtimes (%s): segmentation runs on PyTorch", exc)
    return [str(r) for r in missing if installed_version(r.name) is None]


def resume_pending() -> dict | None:
    """The installation interrupted by a restart, when it can continue now (PyTorchUtils importable)."""
    pending = settings.pending_install()
    if pending is None:
        return None
    if importlib.util.find_spec("PyTorchUtils") is None:
        return None  # the restart did not activate the extension yet: keep the marker
    return pending


# ------------------------------------------------------------------------------- CUDA
def cuda_driver_devices() -> int | None:
    """Number of CUDA devices the NVIDIA driver reports, or None when there is no driver library."""
    names = {"win32": ["nvcuda.dll"], "darwin": []}.get(sys.platform, ["libcuda.so.1", "libcuda.so"])
    found = ctypes.util.find_library("cuda")
    if found:
        names.append(found)
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        try:
            if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
                return 0
        except AttributeError:
            return 0
        return int(count.value)
    return None


def torch_build() -> tuple[str | None, str]:
    """(installed torch version, "cpu" / "cuda" / "unknown") from the metadata, without importing torch."""
    version = installed_version("torch")
    if version is None:
        return None, "unknown"
    local = version.split("+", 1)[1] if "+" in version else ""
    if local.startswith("cpu"):
        return version, "cpu"
    if local.startswith(("cu", "rocm")):
        return version, "cuda"
    try:
        needs = importlib.metadata.requires("torch") or []
    except importlib.metadata.PackageNotFoundError:
        needs = []
    if any(r.lower().startswith("nvidia-") for r in needs):
        return version, "cuda"
    return version, "cpu" if sys.platform == "darwin" else "unknown"


def cuda_status() -> tuple[bool, str]:
    """(CUDA usable, a sentence for the user).  Never imports torch; the engine's child process
    makes the final check and reports the device it used."""
    torch = sys.modules.get("torch")
    if torch is not None:  # already imported by someone: asking it is free
        try:
            ok = bool(torch.cuda.is_available())
        except Exception:
            ok = False
        return ok, ("CUDA is available: 'auto' uses the GPU." if ok else
                    f"CUDA is not available (torch {torch.__version__}): segmentation runs on the CPU, which is slower.")
    version, build = torch_build()
    if version is None:
        return False, "PyTorch is not installed yet: it will be installed when you press Segment."
    devices = cuda_driver_devices()
    if build == "cpu":
        return False, f"CUDA is not available (a CPU-only PyTorch build, torch {version}): segmentation runs on the CPU, which is slower."
    if not devices:
        return False, f"CUDA is not available (no CUDA GPU/driver found, torch {version}): segmentation runs on the CPU, which is slower."
    return True, f"CUDA driver found ({devices} GPU(s)); 'auto' uses the GPU (torch {version})."
