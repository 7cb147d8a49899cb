"""ONNX exports of a model's networks, cached and keyed by the weights' sha256.

The first time a model runs on an ONNX runtime its checksum-verified PyTorch network is
exported (``torch.onnx``) into ``<model folder>/.onnx-cache/`` (or, for the read-only shipped
models, ``<user model folder>/.onnx-cache/``) as ``<part>-<sha256[:16]>.onnx`` with a manifest
``<part>-<sha256[:16]>.json``: the full sha256 of the source safetensors, the sha256 of the ONNX
file, the input spec, the exporter versions and a signature.  Both files are written atomically.

Trust.  Whoever can write a cache folder can write both files, so a manifest's own checksums
prove nothing.  A cached file is used only when

1. the card records the export of these very weights (``onnx`` in card.json, see below) and the
   file's sha256 equals that record -- the card is what the user chose and its weights are
   verified, so its record is trusted as they are; or
2. its manifest is signed (HMAC-SHA256) with this user's own key (``.onnx-cache-key`` in the user
   model folder, created 0600, refused unless it is a regular file of this user that nobody else
   can read -- on Windows, which has no mode bits, the ACLs of the user's profile decide) and
   names these weights, these inputs and the torch installed here, and the file's sha256 matches
   it: the export was made here, by this code, from the verified weights.
   A cache copied in from elsewhere, or edited by anyone without the key, fails.

Anything else -- stale (retrained weights), edited, truncated, forged -- is refused with a note
and exported again from the verified weights; nothing unverified is ever loaded.  The model's
own weights are checked against the card every time, so a damaged model folder is refused too.

Where.  A model folder's ``.onnx-cache`` that is a symbolic link, not a folder or leads outside
the model folder is not used (the user cache is, with a note): exports never land outside the
folders the user chose.  When the user model folder cannot hold a cache (``LESIONSEG_MODELS`` is
a file or cannot be created), exports go to a temporary folder removed when the process ends.

The card names its exports (``onnx``: per network, the file, its sha256, the source weights'
sha256, the opset and the torch that made it; written by ``lesionseg models export NAME
--write-card``).  An export made here that differs from that record (another torch) is used, as
it is made from the verified weights, with a note naming both checksums and torch versions.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import os
import stat
from pathlib import Path
from typing import Callable

from ..atomic import AtomicWriter
from ..errors import ModelError
from ..models import ModelCard, sha256_file, user_models_dir, user_models_problem

CACHE_DIR = ".onnx-cache"
KEY_FILE = ".onnx-cache-key"
MANIFEST_FORMAT = 2  # 2: signed (format 1 manifests are not trusted)
OPSET = 17
SIGNED = ("format", "source_sha256", "onnx_sha256", "spec", "opset", "torch")
_TEMP: list[Path] = []  # the process's temporary cache folder, when the user model folder cannot hold one
DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}  # a cache that cannot be written: a temporary one is used


def cache_location(card: ModelCard) -> tuple[Path, list[str]]:
    """(where the exports of ``card`` live, notes): next to the model unless it is shipped or
    read-only, or its cache folder is unsafe; else the user cache; else a temporary folder."""
    notes = []
    if not card.builtin and os.access(card.folder, os.W_OK):
        own = card.folder / CACHE_DIR
        problem = _unsafe(own, card.folder)
        if problem is None:
            return own, notes
        notes.append(f"the ONNX cache {own} of model {card.id} is not used ({problem}); its exports go to the user cache")
    user = user_models_dir() / CACHE_DIR
    problem = user_models_problem(create=True)
    if problem is None and (user.is_symlink() or (user.exists() and not user.is_dir())):
        problem = f"{user} is not a folder"
    if problem is None:
        return user, notes
    notes.append(f"{problem}: the ONNX exports of model {card.id} are made in a temporary folder for this run "
                 "(point LESIONSEG_MODELS to a writable folder to keep them)")
    return _temp_folder(), notes


def cache_folder(card: ModelCard) -> Path:
    """Where the exports of ``card`` live (see :func:`cache_location`)."""
    return cache_location(card)[0]


def _unsafe(folder: Path, model_folder: Path) -> str | None:
    """Why a model folder's cache folder must not be written, or None."""
    if folder.is_symlink():
        return "it is a symbolic link"
    if folder.exists() and not folder.is_dir():
        return "it is not a folder"
    try:
        folder.resolve().relative_to(model_folder.resolve())
    except (ValueError, OSError):
        return "it leads outside the model folder"
    return None


def _temp_folder() -> Path:
    if not _TEMP:
        import atexit
        import shutil
        import tempfile

        _TEMP.append(Path(tempfile.mkdtemp(prefix="lesionseg-onnx-")))
        atexit.register(shutil.rmtree, _TEMP[0], True)
    return _TEMP[0]


def export_paths(card: ModelCard, part: str) -> tuple[Path, Path]:
    """(ONNX file, manifest) of the export of ``card``'s ``part``, keyed by its weights' sha256."""
    stem = f"{part}-{card.part(part)['sha256'][:16]}"
    folder = cache_folder(card)
    return folder / f"{stem}.onnx", folder / f"{stem}.json"


def _binary() -> int:
    """``os.O_BINARY`` where there is one (Windows): without it ``os.open`` gives a text-mode
    descriptor there, whose reads drop the CR of every CR LF and stop at 0x1A."""
    return getattr(os, "O_BINARY", 0)


def _read_flags() -> int:
    """How a file whose bytes are verified is opened: read-only, binary, never through a symbolic
    link, and never blocking (a FIFO planted in its place)."""
    return os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | _binary()


def _key(create: bool = True) -> bytes | None:
    """This user's signing key (32 random bytes in ``<user model folder>/.onnx-cache-key``, mode
    0600), made on first use; None where there is no safe one (no signed cache is trusted then)."""
    path = user_models_dir() / KEY_FILE
    try:
        fd = os.open(path, _read_flags())
    except FileNotFoundError:
        if not create or user_models_problem(create=True):
            return None
        import secrets

        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | _binary(), 0o600)
        except FileExistsError:  # another process made it meanwhile
            return _key(create=False)
        except OSError:
            return None
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
        except OSError:  # a full disk: no key is left half-written (it would never be trusted nor made again)
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None
        return _key(create=False)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        mine = not hasattr(os, "getuid") or st.st_uid == os.getuid()
        # Windows has no POSIX mode bits (fstat says 0o666 for any writable file): there the ACLs of
        # the user's own profile folder keep others out, so only the other checks apply
        private = os.name == "nt" or not st.st_mode & 0o077
        if not stat.S_ISREG(st.st_mode) or not mine or not private or st.st_size != 32:
            return None
        return fh.read()


def _signature(key: bytes, manifest: dict) -> str:
    body = json.dumps({k: manifest.get(k) for k in SIGNED}, sort_keys=True).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def _torch_version() -> str | None:
    """The installed torch's version, without importing torch (a cached export runs without it)."""
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _read_regular(path: Path) -> bytes | None:
    """The bytes of ``path`` read through one descriptor (never through a link), or None when it is
    not a regular file or cannot be read.  The bytes verified are the bytes run: nobody can swap
    the file between its check and its use."""
    try:
        fd = os.open(path, _read_flags())
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        try:
            return fh.read() if stat.S_ISREG(os.fstat(fh.fileno()).st_mode) else None
        except OSError:
            return None


def _reference(card: ModelCard, part: str, spec) -> dict | None:
    """The card's record of the export of these very weights for these inputs, or None."""
    ref = card.data.get("onnx")
    ref = ref.get(part) if isinstance(ref, dict) else None
    if not isinstance(ref, dict) or ref.get("source_sha256") != card.part(part).get("sha256") \
            or not isinstance(ref.get("sha256"), str) or (spec is not ANY_SPEC and ref.get("spec") not in (None, spec)):
        return None
    return ref


def cached_onnx(card: ModelCard, part: str, spec: dict, build: Callable[[], tuple]) -> tuple[bytes, list[str]]:
    """The bytes of a verified ONNX export of ``card``'s ``part`` (segmenter, classifier, detector,
    roi_segmenter), and notes.  The runtimes load these very bytes, never the file again.

    ``spec``: JSON-able description of the inputs (names, shapes, dynamic axes) -- part of the key.
    ``build()`` -> (torch module in eval mode, example inputs tuple, input names, output names,
    dynamic axes); it is only called when an export is needed.
    """
    source_sha = card.part(part).get("sha256")
    if not source_sha:
        raise ModelError(f"model {card.id}: card gives no sha256 for {part}; refusing to export it")
    # The model's own weights must match the card even when a verified export of them is cached: a
    # damaged model folder is refused on every runtime, as `models activate` and torch refuse it.
    card.verified_path(part)
    folder, notes = cache_location(card)
    stem = f"{part}-{source_sha[:16]}"
    onnx_path, manifest_path = folder / f"{stem}.onnx", folder / f"{stem}.json"
    data = _read_regular(onnx_path)
    made, problem = inspect_cache(onnx_path, manifest_path, source_sha, spec, _reference(card, part, spec), data)
    if problem is None:
        return data, notes + reference_notes(card, part, made)
    if problem != "missing":
        notes.append(f"ONNX cache {onnx_path.name} of model {card.id} refused ({problem}): exported again from the verified weights")
    try:
        made = export(build, folder, onnx_path.name, manifest_path.name, source_sha, spec)
    except OSError as exc:  # a full disk (or quota) under the cache: this run's exports go to a temporary folder
        if exc.errno not in DISK_FULL or folder in _TEMP:
            raise
        notes.append(f"the ONNX cache {folder} cannot be written ({exc.strerror}): the ONNX exports of model {card.id} "
                     "are made in a temporary folder for this run (free space there to keep them)")
        folder = _temp_folder()
        onnx_path, manifest_path = folder / onnx_path.name, folder / manifest_path.name
        made = export(build, folder, onnx_path.name, manifest_path.name, source_sha, spec)
    data = _read_regular(onnx_path)
    if data is None or hashlib.sha256(data).hexdigest() != made["onnx_sha256"]:
        raise ModelError(f"model {card.id}: the ONNX export of {part} changed while it was written to {folder}")
    return data, notes + reference_notes(card, part, made)


def reference_notes(card: ModelCard, part: str, made: dict) -> list[str]:
    """A note when the card names an export of these very weights that differs from this one
    (``made``: the verified manifest of the export in use, made here from the verified weights)."""
    ref = _reference(card, part, ANY_SPEC)
    if ref is None or made.get("onnx_sha256") == ref.get("sha256"):
        return []  # no record, a record of other weights (a retrained part), or the recorded file
    return [f"model {card.id}: the ONNX export of {part} (sha256 {str(made.get('onnx_sha256', '?'))[:12]}, torch {made.get('torch')}) "
            f"differs from the one its card names ({str(ref.get('sha256'))[:12]}, torch {ref.get('torch')}); "
            "it was exported here from the same verified weights and is used"]


def card_record(card: ModelCard, parts) -> dict:
    """The card's ``onnx`` section for the cached, verified exports of ``parts``."""
    out = {}
    for part in parts:
        onnx_path, manifest_path = export_paths(card, part)
        sha = card.part(part)["sha256"]
        made, problem = inspect_cache(onnx_path, manifest_path, sha, ANY_SPEC, _reference(card, part, ANY_SPEC))
        if problem is not None:
            raise ModelError(f"model {card.id}: the cached ONNX export of {part} cannot be recorded ({problem})")
        out[part] = {"file": onnx_path.name, "sha256": made["onnx_sha256"], "source_sha256": sha, "opset": made.get("opset"),
                     "torch": made.get("torch"), "spec": made.get("spec")}
    return out


ANY_SPEC = object()  # inspect_cache: accept the inputs the manifest names


def inspect_cache(onnx_path: Path, manifest_path: Path, source_sha: str, spec, ref: dict | None = None,
                  data: bytes | None = None) -> tuple[dict | None, str | None]:
    """(what the cached export is, None) when it may be used, else (None, the reason it may not):
    it is the export the card records (``ref``), or one signed with this user's key (see the module
    text).  ``spec=ANY_SPEC`` accepts whatever inputs it was made for.  ``data``: the file's bytes
    as the caller read them (:func:`_read_regular`), which are what is judged; read here if None."""
    if not onnx_path.exists() and not onnx_path.is_symlink():
        return None, "missing"
    if data is None:
        data = _read_regular(onnx_path)
    if data is None:
        return None, "not a regular file"
    actual = hashlib.sha256(data).hexdigest()
    if ref is not None and actual == ref.get("sha256"):
        return {k: ref.get(k) for k in ("opset", "torch", "spec")} | {"onnx_sha256": actual, "source_sha256": source_sha}, None
    manifest, problem = _signed_manifest(manifest_path, actual, source_sha, spec)
    if problem is not None and ref is not None:
        problem = f"checksum mismatch: it is not the export its card records, and {problem}"
    return manifest, problem


def _signed_manifest(manifest_path: Path, actual: str, source_sha: str, spec) -> tuple[dict | None, str | None]:
    """The manifest of a cached export whose sha256 is ``actual``, when this user's LesionSeg
    wrote and signed it for these weights, inputs and torch; else (None, why not)."""
    if not _regular(manifest_path):
        return None, "its manifest is missing" if not manifest_path.exists() else "its manifest is not a regular file"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None, "its manifest is unreadable"
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None, "its manifest is of an unknown format"
    if manifest.get("source_sha256") != source_sha:
        return None, "made from other weights"
    if spec is not ANY_SPEC and manifest.get("spec") != spec:
        return None, "made for other inputs"
    if manifest.get("torch") != _torch_version():
        return None, "made by another torch"
    if manifest.get("onnx_sha256") != actual:
        return None, "checksum mismatch: the file was modified or is incomplete"
    key = _key()
    if key is None or not isinstance(manifest.get("signature"), str) \
            or not hmac.compare_digest(manifest["signature"], _signature(key, manifest)):
        return None, "its manifest is not signed by this user's LesionSeg: made elsewhere or edited"
    return manifest, None


def export(build: Callable[[], tuple], folder: Path, onnx_name: str, manifest_name: str, source_sha: str, spec: dict) -> dict:
    """Export ``build()``'s module into ``folder``; returns the manifest written next to it."""
    import warnings

    import torch

    module, example, input_names, output_names, dynamic_axes = build()
    folder.mkdir(parents=True, exist_ok=True)
    with AtomicWriter(folder) as writer:
        tmp = writer.path(onnx_name)
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                example,
                tmp,
                dynamo=False,  # the TorchScript exporter: fast, and exact for these convolutional nets
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes or None,
                opset_version=OPSET,
                # the module is in eval mode either way; PRESERVE skips the exporter's eval peephole, which
                # folds each BatchNorm into its Conv with float arithmetic whose last bits depend on the
                # CPU, so the same weights and torch gave another sha256 on another machine; the runtimes
                # (ONNX Runtime, OpenVINO) fuse them themselves when they load the graph
                training=torch.onnx.TrainingMode.PRESERVE,
            )
        manifest = {
            "format": MANIFEST_FORMAT,
            "source_sha256": source_sha,
            "onnx_sha256": sha256_file(tmp),
            "spec": spec,
            "opset": OPSET,
            "torch": _torch_version() or torch.__version__,
        }
        key = _key()
        if key is not None:
            manifest["signature"] = _signature(key, manifest)
        with open(writer.path(manifest_name), "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=2)
    return manifest
