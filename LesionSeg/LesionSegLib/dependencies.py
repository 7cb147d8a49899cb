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
  after the restart (:func:`resume_pending`); the marker holds what the user confirmed, and
  anything more that :func:`check` reports then is asked about again (:func:`unconfirmed`).  An
  installed torch that does not fit is replaced in place by ``installTorch`` (never uninstalled
  first, so a failed download keeps it).  Everything else goes through
  ``slicer.packaging``/``slicer.pydeps`` ``pip_ensure`` where this Slicer has it, else
  ``slicer.util.pip_install``.  An upgrade of a package Slicer had already imported asks for a
  restart too.
* The fast runtimes (``requirements-runtime.txt``, :func:`runtime_problems`) are optional: the
  panel offers them in a question of their own and :func:`install` installs them, best-effort,
  only when passed (the user said yes); a "no" is remembered (:func:`decline_runtimes`).
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
import json
import logging
import os
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
#: settings key of the runtime requirements the user declined (JSON list)
DECLINED_RUNTIMES_KEY = "LesionSeg/DeclinedRuntimes"
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


def _write_pending(problems, runtimes, reason: str) -> None:
    """The pending-install marker (``settings.PENDING_INSTALL_KEY``): what the user confirmed
    (required requirements and optional runtimes), why, and this process's id (a marker written by
    this very process means Slicer has not restarted yet)."""
    data = {"requirements": [str(p.requirement) for p in problems], "runtimes": [str(p.requirement) for p in runtimes],
            "reason": reason, "pid": os.getpid()}
    store = settings.user_settings()
    store.setValue(settings.PENDING_INSTALL_KEY, json.dumps(data))
    store.sync()  # the restart may come at once


def _pytorch_extension_missing(problem: Problem, problems, runtimes) -> InstallResult:
    """PyTorchUtils cannot be imported: install the PyTorch extension (a restart follows), or say
    why it cannot be used when it is installed already (no restart loop)."""
    slicer = _slicer()
    manager = getattr(getattr(slicer, "app", None), "extensionsManagerModel", lambda: None)()
    if manager is None:
        raise RuntimeError(f"LesionSeg needs PyTorch ({problem.requirement}). Install the '{PYTORCH_EXTENSION}' extension "
                           "from the Extensions Manager, restart Slicer, and press Segment again.")
    if manager.isExtensionInstalled(PYTORCH_EXTENSION):
        pending = settings.pending_install()
        if not (pending and pending.get("pid") == os.getpid()):  # installed before this Slicer started
            enabled = getattr(manager, "isExtensionEnabled", None)
            state = "disabled" if callable(enabled) and not enabled(PYTORCH_EXTENSION) else "installed but cannot be loaded"
            raise RuntimeError(f"The '{PYTORCH_EXTENSION}' extension is {state} (its PyTorchUtils module cannot be imported). "
                               "Check it in the Extensions Manager (enable, update or reinstall it); if you installed it "
                               "during this Slicer session, restart Slicer once.")
    elif not manager.installExtensionFromServer(PYTORCH_EXTENSION, False):
        raise RuntimeError(f"The '{PYTORCH_EXTENSION}' extension could not be installed from the extension server; "
                           "install it from the Extensions Manager, then restart Slicer.")
    reason = f"the '{PYTORCH_EXTENSION}' extension was installed; restart Slicer to finish installing LesionSeg's packages"
    _write_pending(problems, runtimes, reason)
    return InstallResult(True, reason)


def platform_problem() -> str | None:
    """Why torch cannot be installed on this platform at all, else None: PyTorch publishes no wheels
    for Intel macOS after 2.2.2, and Slicer for macOS may run as an Intel build (under Rosetta)."""
    import platform

    if sys.platform == "darwin" and platform.machine() == "x86_64":
        return (f"PyTorch ({torch_requirement()}) has no build for Intel macOS (its last one is 2.2.2), and this "
                "Slicer runs as an Intel (x86_64) build: LesionSeg cannot run here; use a native Apple-silicon "
                "build of Slicer if there is one for your version, or Slicer on Windows or Linux")
    return None


def _install_torch(problem: Problem, problems=(), runtimes=()) -> InstallResult | None:
    """torch through PyTorchUtils; an InstallResult when a restart must come first.

    ``installTorch`` runs ``light-the-torch install torch<requirement> torchvision`` (pip): an
    installed torch that does not fit is upgraded (or downgraded) in place, and pip keeps it when
    the new one cannot be downloaded or installed.  So torch is never uninstalled first: a failed
    installation leaves the torch that was there (other extensions may use it)."""
    if (why := platform_problem()) is not None:  # said before a download that cannot succeed
        raise RuntimeError(why)
    try:
        import PyTorchUtils  # the "PyTorch" Slicer extension
    except ImportError:
        return _pytorch_extension_missing(problem, problems or [problem], runtimes)
    logic = PyTorchUtils.PyTorchUtilsLogic()
    error = None
    try:
        torch = _call_supported(logic.installTorch, askConfirmation=False, torchVersionRequirement=str(problem.requirement.specifier))
    except Exception as exc:  # offline, pip error: PyTorchUtils raises (CalledProcessError) or returns None
        torch, error = None, exc
    importlib.invalidate_caches()
    have = installed_version("torch")
    if torch is None or not satisfied(problem.requirement, have):
        kept = f"torch {have} is still installed" if have else "no torch is installed"
        raise RuntimeError(f"PyTorch ({problem.requirement}) could not be installed"
                           f"{f' ({error})' if error else ''}; {kept}.")
    return None


def install(problems, requester: str = "LesionSeg", runtimes=()) -> InstallResult:
    """Install what ``problems`` (from :func:`check`) lists, and the optional ``runtimes`` (from
    :func:`runtime_problems`) best-effort; the caller asked the user about both first.

    Returns whether Slicer must restart (the PyTorch extension was just installed, or a package
    that Slicer had imported was upgraded).  Raises ``RuntimeError`` naming what is still wrong.
    """
    problems, runtimes = list(problems), list(runtimes)
    if _SELF_TEST:
        raise InstallRefused("a module self-test never installs packages: " + describe(problems + runtimes))
    slicer = _slicer()
    upgraded = [p.name for p in problems if p.installed is not None]
    torch = [p for p in problems if p.name == "torch"]
    if torch:
        pending = _install_torch(torch[0], problems, runtimes)
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
    if still:
        raise RuntimeError("these packages still do not fit after installation: " + describe(still))
    missing = {p.name for p in install_runtimes(runtimes)}
    note = f"; the optional {', '.join(sorted(missing))} could not be installed: segmentation runs on PyTorch" if missing else ""
    stale = _imported(upgraded)
    if stale:
        return InstallResult(True, "restart Slicer to use the new versions of " + ", ".join(stale) + note)
    settings.clear_pending_install()
    done = [str(p.requirement) for p in problems + runtimes if p.name not in missing]
    return InstallResult(False, ("installed " + ", ".join(done) if done else "nothing installed") + note)


# ------------------------------------------------------------------ the fast runtimes
def runtime_problems() -> list[Problem]:
    """The fast runtimes (OpenVINO, ONNX Runtime, onnx) that are missing or do not fit (optional)."""
    importlib.invalidate_caches()
    reqs = [Requirement(f"{r.name}{r.specifier}")  # the platform marker said yes: texts and pip get the plain spec
            for r in load_requirements(RUNTIME_REQUIREMENTS_FILE) if r.marker is None or r.marker.evaluate()]
    return [Problem(r, installed_version(r.name), True) for r in reqs if not satisfied(r, installed_version(r.name))]


def declined_runtimes() -> set[str]:
    """The runtime requirements the user said no to (not offered again until the list changes)."""
    try:
        value = json.loads(settings._text(settings.user_settings().value(DECLINED_RUNTIMES_KEY)) or "[]")
    except ValueError:
        return set()
    return {str(v) for v in value} if isinstance(value, list) else set()


def decline_runtimes(runtimes) -> list:
    """Remember that the user declined these runtimes; returns the empty list of what to install."""
    store = settings.user_settings()
    store.setValue(DECLINED_RUNTIMES_KEY, json.dumps(sorted(declined_runtimes() | {str(p.requirement) for p in runtimes})))
    store.sync()
    return []


def runtimes_to_offer() -> list[Problem]:
    declined = declined_runtimes()
    return [p for p in runtime_problems() if str(p.requirement) not in declined]


def install_runtimes(runtimes) -> list[Problem]:
    """Install these runtimes (the user agreed) best-effort; returns those still missing or unfit.
    A failure is logged, never raised: the engine then runs the networks on PyTorch."""
    wanted = {p.name for p in runtimes}
    if not wanted or _SELF_TEST:
        return list(runtimes)
    try:
        _slicer().util.pip_install([str(p.requirement) for p in runtimes])
    except Exception as exc:  # best effort: PyTorch remains the runtime
        log.warning("could not install the fast runtimes (%s): segmentation runs on PyTorch", exc)
    return [p for p in runtime_problems() if p.name in wanted]


# ------------------------------------------------------------- texts and the restart
def confirmation_text(problems, new=()) -> str:
    """The question asked before installing the required ``problems``."""
    since = f"\n\nSince the restart, Slicer also reports: {describe(new)}." if new else ""
    return ("LesionSeg needs these Python packages, which are missing or at an unsuitable version in Slicer: "
            f"{describe(problems)}.{since}\n\nInstall them now? This downloads several hundred MB and can take a few minutes.")


def runtimes_text(runtimes) -> str:
    return ("Optional: these packages run LesionSeg's networks faster on the CPU: "
            f"{describe(runtimes)}. Without them segmentation runs on PyTorch.\n\n"
            "Install them now? If you answer no, you are not asked again for these versions.")


def unconfirmed(problems, pending: dict) -> list[Problem]:
    """The problems that are not among what the user confirmed before the restart (the marker)."""
    confirmed = {str(r) for r in (pending.get("requirements") or [])}  # written as str(Requirement)
    return [p for p in problems if str(p.requirement) not in confirmed]


def pending_runtimes(pending: dict) -> list[Problem]:
    """The confirmed runtimes of the marker that are still to install."""
    confirmed = {str(r) for r in (pending.get("runtimes") or [])}  # written as str(Requirement)
    return [p for p in runtime_problems() if str(p.requirement) in confirmed]


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
