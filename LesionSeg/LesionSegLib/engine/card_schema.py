"""The shape of a model card: types, lengths and ranges of what the engine reads from ``card.json``.

:func:`check_card` is run on every card that is asked for by name or path (``models.get_card``)
and before a model is activated; it raises :class:`~.errors.ModelError` naming the card and the
field (``segmenter.roi_size``), so a bad card is never blamed on the CT it is run on and never
runs with silently wrong settings.  :func:`check_structure` is the cheap part that every listed
card passes (a JSON object with a text name and version).

Only what the engine uses is checked; the descriptive sections (``training``, ``validation``,
``data``, ``finetuning``...) may hold anything.  Sizes are bounded (a network's channels, a
window's voxels), so a card cannot make the engine allocate terabytes.
"""
from __future__ import annotations

import math
import re

from .errors import ModelError

SHA_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_CHANNELS = 4096  # channels of one network layer
MAX_SIDE = 1024  # voxels along one side of a window / patch / RoI
MAX_VOXELS = 256**3  # voxels of one window
SEGMENTER_TYPES = ("DynUNet", "AttentionUnet", "AttentionUnetDS", "UNet")
#: sections that, when present, are a JSON object (the engine reads keys from them)
OBJECT_SECTIONS = ("segmenter", "click_segmenter", "classifier", "ood", "gate", "postprocess", "onnx", "routing",
                   "detector", "roi_segmenter", "metrics", "files", "domain")


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


class _Bad(Exception):
    """A field that fails its check: (field path, problem)."""


def _num(v, where, lo=None, hi=None, lo_open=False, hi_open=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or abs(v) > 1e12 or not math.isfinite(v):
        raise _Bad(where, f"must be a finite number, not {_show(v)}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise _Bad(where, f"must be {'>' if lo_open else '>='} {lo}, not {v}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise _Bad(where, f"must be {'<' if hi_open else '<='} {hi}, not {v}")
    return v


def _pos(v, where):
    return _num(v, where, 0, lo_open=True)


def _int(v, where, lo=1, hi=None):
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Bad(where, f"must be a whole number, not {_show(v)}")
    return _num(v, where, lo, hi)


def _list(v, where, n=None, min_n=1, max_n=64):
    if not isinstance(v, list):
        raise _Bad(where, f"must be a list, not {type(v).__name__}")
    if n is not None and len(v) != n:
        raise _Bad(where, f"must have {n} entries, not {len(v)}")
    if not min_n <= len(v) <= max_n:
        raise _Bad(where, f"must have {min_n} to {max_n} entries, not {len(v)}")
    return v


def _obj(v, where):
    if not isinstance(v, dict):
        raise _Bad(where, f"must be an object, not {type(v).__name__}")
    return v


def _text(v, where, choices=None):
    if not isinstance(v, str) or not v:
        raise _Bad(where, f"must be a non-empty text, not {_show(v)}")
    if choices is not None and v not in choices:
        raise _Bad(where, f"must be one of {', '.join(choices)}, not {_show(v)}")
    return v


def _ints(v, where, n=None, hi=MAX_CHANNELS, min_n=1):
    for i, x in enumerate(_list(v, where, n, min_n=min_n)):
        _int(x, f"{where}[{i}]", 1, hi)
    return v


def _shape3(v, where):
    _ints(v, where, 3, MAX_SIDE)
    if math.prod(v) > MAX_VOXELS:
        raise _Bad(where, f"holds {math.prod(v)} voxels, more than {MAX_VOXELS}")
    return v


def _spacing(v, where):
    for i, x in enumerate(_list(v, where, 3)):
        _num(x, f"{where}[{i}]", 0, 1000, lo_open=True)


def _windows(v, where):
    for i, w in enumerate(_list(v, where, max_n=8)):
        _list(w, f"{where}[{i}]", 2)
        lo, hi = (_num(x, f"{where}[{i}][{j}]") for j, x in enumerate(w))
        if not lo < hi:
            raise _Bad(f"{where}[{i}]", f"must be [low, high] with low < high, not {w}")
    return v


def _weights(part, where):
    _text(part.get("file"), f"{where}.file")
    sha = part.get("sha256")
    if not isinstance(sha, str) or not SHA_RE.match(sha):
        raise _Bad(f"{where}.sha256", f"must be 64 lower-case hex digits, not {_show(sha)}")


def _strides(v, where):
    for i, s in enumerate(_list(v, where, max_n=12)):
        if isinstance(s, list):
            _ints(s, f"{where}[{i}]", 3, 16)
        else:
            _int(s, f"{where}[{i}]", 1, 16)


def _segmenter_network(net, where, in_channels):
    _obj(net, where)
    kind = net.get("type", "DynUNet")
    _text(kind, f"{where}.type", SEGMENTER_TYPES)
    got = net.get("in_channels", 1)
    _int(got, f"{where}.in_channels", 1, 16)
    if got != in_channels:
        raise _Bad(f"{where}.in_channels", f"is {got}, but the card's hu_windows (and guidance) give {in_channels} input channels")
    if net.get("out_channels", 2) != 2:
        raise _Bad(f"{where}.out_channels", f"must be 2 (background, lesion), not {_show(net.get('out_channels'))}")
    if kind == "DynUNet":
        for key in ("kernel_size", "strides", "filters"):
            if key not in net:
                raise _Bad(f"{where}.{key}", "is missing")
        _strides(net["kernel_size"], f"{where}.kernel_size")
        _strides(net["strides"], f"{where}.strides")
        _ints(net["filters"], f"{where}.filters")
        if len(net["kernel_size"]) != len(net["strides"]) or len(net["filters"]) < len(net["strides"]):
            raise _Bad(where, "needs as many kernel_size as strides entries and at least as many filters")
        _opt_int(net, "deep_supr_num", where, 0, 8)
    else:
        for key in ("channels", "strides"):
            if key not in net:
                raise _Bad(f"{where}.{key}", "is missing")
        _ints(net["channels"], f"{where}.channels", min_n=2)
        _strides(net["strides"], f"{where}.strides")
        if len(net["strides"]) != len(net["channels"]) - 1:
            raise _Bad(where, f"needs one stride fewer than channels ({len(net['channels'])} channels, {len(net['strides'])} strides)")
        _opt_int(net, "num_res_units", where, 0, 8)
        _opt_int(net, "ds_heads", where, 0, 8)
    if "dropout" in net:
        _num(net["dropout"], f"{where}.dropout", 0, 1, hi_open=True)


def _opt_int(d, key, where, lo, hi):
    if key in d:
        _int(d[key], f"{where}.{key}", lo, hi)


def _segmenter(part, where, guidance=False):
    _obj(part, where)
    _weights(part, where)
    for key in ("network", "roi_size", "spacing_zyx", "hu_windows"):
        if key not in part:
            raise _Bad(f"{where}.{key}", "is missing")
    _shape3(part["roi_size"], f"{where}.roi_size")
    _spacing(part["spacing_zyx"], f"{where}.spacing_zyx")
    _windows(part["hu_windows"], f"{where}.hu_windows")
    if "overlap" in part:
        _num(part["overlap"], f"{where}.overlap", 0, 1, hi_open=True)
    if guidance:
        _obj(part.get("guidance"), f"{where}.guidance")
        _pos(part["guidance"].get("sigma_mm"), f"{where}.guidance.sigma_mm")
    _segmenter_network(part["network"], f"{where}.network", len(part["hu_windows"]) + int(guidance))


def _classifier(part, where="classifier"):
    from .segment.features import FEATURE_NAMES, PATCH_SIZE

    _obj(part, where)
    _weights(part, where)
    names = part.get("feature_names", FEATURE_NAMES)
    if names != list(FEATURE_NAMES):
        raise _Bad(f"{where}.feature_names", f"must be this engine's {len(FEATURE_NAMES)} features ({FEATURE_NAMES[0]}, ...)")
    for key in ("feature_mean", "feature_std"):
        v = _list(part.get(key), f"{where}.{key}", len(FEATURE_NAMES), max_n=len(FEATURE_NAMES))
        for i, x in enumerate(v):
            if key == "feature_std":
                _pos(x, f"{where}.{key}[{i}]")
            else:
                _num(x, f"{where}.{key}[{i}]")
    if "patch_size" in part and part["patch_size"] != list(PATCH_SIZE):
        raise _Bad(f"{where}.patch_size", f"must be this engine's {list(PATCH_SIZE)}, not {_show(part['patch_size'])}")
    if "temperature" in part:
        _pos(part["temperature"], f"{where}.temperature")
    net = part.get("network")
    if net is not None:
        _obj(net, f"{where}.network")
        _text(net.get("type", "PatchClassifier"), f"{where}.network.type", ("PatchClassifier",))
        if "channels" in net:
            _ints(net["channels"], f"{where}.network.channels")
        for key in ("feature_hidden", "head_hidden"):
            _opt_int(net, key, f"{where}.network", 1, MAX_CHANNELS)
        if "dropout" in net:
            _num(net["dropout"], f"{where}.network.dropout", 0, 1, hi_open=True)


def _ood(part, where="ood"):
    _obj(part, where)
    _weights(part, where)
    if "scan_descriptor" in part:
        _int(part["scan_descriptor"], f"{where}.scan_descriptor", 1, 1000)
    if "lesion_method" in part:
        _text(part["lesion_method"], f"{where}.lesion_method", ("knn", "mahalanobis"))
    if "scan_threshold" in part:
        _pos(part["scan_threshold"], f"{where}.scan_threshold")
    if "cap" in part:
        _num(part["cap"], f"{where}.cap", 0, 1)
    if "domain" in part and not isinstance(part["domain"], str):
        raise _Bad(f"{where}.domain", "must be a text")


def _gate(part, where="gate"):
    _obj(part, where)
    _weights(part, where)
    _num(part.get("threshold"), f"{where}.threshold", 0, 1)
    _opt_int(part, "slab", where, 1, MAX_SIDE)
    _opt_int(part, "margin", where, 0, MAX_SIDE)
    if "network" in part:
        net = _obj(part["network"], f"{where}.network")
        if "channels" in net:
            _ints(net["channels"], f"{where}.network.channels")
        _opt_int(net, "in_channels", f"{where}.network", 1, 16)
        _opt_int(net, "pool", f"{where}.network", 1, 64)


def _detector(part, where="detector"):
    _obj(part, where)
    _weights(part, where)
    net = _obj(part.get("network"), f"{where}.network")
    _text(net.get("type", "CenterFPN"), f"{where}.network.type", ("CenterFPN",))
    if "channels" in net:
        _ints(net["channels"], f"{where}.network.channels", min_n=2)
    _opt_int(net, "fpn_channels", f"{where}.network", 1, MAX_CHANNELS)
    _spacing(part.get("grid_spacing_zyx"), f"{where}.grid_spacing_zyx")
    _windows(part.get("hu_windows"), f"{where}.hu_windows")
    if net.get("in_channels", 2) != len(part["hu_windows"]):
        raise _Bad(f"{where}.network.in_channels", f"must equal the {len(part['hu_windows'])} hu_windows")
    if "crop_shape" in part:
        _shape3(part["crop_shape"], f"{where}.crop_shape")
    if "threshold" in part:
        _num(part["threshold"], f"{where}.threshold", 0, 1, lo_open=True)
    _opt_int(part, "max_detections", where, 1, 10000)
    if "nms_iou" in part:
        _num(part["nms_iou"], f"{where}.nms_iou", 0, 1, lo_open=True)
    if "temperature" in part:
        _pos(part["temperature"], f"{where}.temperature")
    if "tta_flips" in part:
        for i, f in enumerate(_list(part["tta_flips"], f"{where}.tta_flips", max_n=8)):
            _list(f, f"{where}.tta_flips[{i}]", min_n=0, max_n=3)
            for j, a in enumerate(f):
                _int(a, f"{where}.tta_flips[{i}][{j}]", 0, 2)


def _roi_segmenter(part, where="roi_segmenter"):
    _obj(part, where)
    _weights(part, where)
    net = _obj(part.get("network"), f"{where}.network")
    _text(net.get("type", "UNet"), f"{where}.network.type", ("UNet",))
    _ints(net.get("channels"), f"{where}.network.channels", min_n=2)
    _strides(net.get("strides"), f"{where}.network.strides")
    _opt_int(net, "num_res_units", f"{where}.network", 0, 8)
    _opt_int(net, "out_channels", f"{where}.network", 1, 1)
    _shape3(part.get("roi_shape"), f"{where}.roi_shape")
    _windows(part.get("hu_windows"), f"{where}.hu_windows")
    if net.get("in_channels", 2) != len(part["hu_windows"]):
        raise _Bad(f"{where}.network.in_channels", f"must equal the {len(part['hu_windows'])} hu_windows")
    if "context" in part:
        for k, v in _obj(part["context"], f"{where}.context").items():
            _pos(v, f"{where}.context.{k}")
    _opt_int(part, "refits", where, 0, 20)
    for key in ("refit_tolerance", "refit_growth", "snap_mm"):
        if key in part:
            _pos(part[key], f"{where}.{key}")
    if "paste" in part:
        _text(part["paste"], f"{where}.paste", ("roi", "lesion"))
    if "dedupe" in part and not isinstance(part["dedupe"], bool):
        raise _Bad(f"{where}.dedupe", "must be true or false")


def _common(data):
    for key in OBJECT_SECTIONS:
        if key in data:
            _obj(data[key], key)
    post = data.get("postprocess", {})
    if "prob_threshold" in post:
        _num(post["prob_threshold"], "postprocess.prob_threshold", 0, 1, lo_open=True, hi_open=True)
    if "min_size_mm3" in post:
        _num(post["min_size_mm3"], "postprocess.min_size_mm3", 0)
    if "confidence_threshold" in data:
        _num(data["confidence_threshold"], "confidence_threshold", 0, 1)
    for part, rec in data.get("onnx", {}).items():
        _obj(rec, f"onnx.{part}")
    routing = data.get("routing")
    if routing:
        if not isinstance(routing.get("enabled", False), bool):
            raise _Bad("routing.enabled", "must be true or false")
        if routing.get("enabled"):
            _text(routing.get("folder"), "routing.folder")
            sha = routing.get("card_sha256")
            if not isinstance(sha, str) or not SHA_RE.match(sha):
                raise _Bad("routing.card_sha256", "must be 64 lower-case hex digits")
    if "ood" in data and data["ood"]:
        _ood(data["ood"])
    if "gate" in data:
        _gate(data["gate"])
    if "classifier" in data:
        _classifier(data["classifier"])


def _clcs(data):
    if "segmenter" not in data:
        raise _Bad("segmenter", "is missing (a clcs model needs a segmenter)")
    _segmenter(data["segmenter"], "segmenter")
    if "click_segmenter" in data:
        _segmenter(data["click_segmenter"], "click_segmenter", guidance=True)


def _detseg(data):
    for key in ("detector", "roi_segmenter"):
        if key not in data:
            raise _Bad(key, "is missing (a detseg model needs a detector and a RoI segmenter)")
    _detector(data["detector"])
    _roi_segmenter(data["roi_segmenter"])
    if "confidence_source" in data:
        _text(data["confidence_source"], "confidence_source", ("classifier", "detector"))


#: architecture -> its own checks (the common ones run for every card)
ARCHITECTURE_CHECKS = {"clcs": _clcs, "detseg": _detseg}


def check_structure(data, where: str) -> None:
    """A card is a JSON object with a text ``name``, a text or numeric ``version`` and a text
    ``architecture``; raise :class:`ModelError` naming the card (``where``) otherwise."""
    if not isinstance(data, dict):
        raise ModelError(f"model card {where} does not hold a JSON object")
    if "name" not in data:
        raise ModelError(f"model card {where} has no 'name'")
    if not isinstance(data["name"], str) or not data["name"].strip():
        raise ModelError(f"model card {where}: 'name' must be a non-empty text, not {_show(data['name'])}")
    v = data.get("version", "1")
    if isinstance(v, bool) or not isinstance(v, (str, int)) or not str(v).strip():
        raise ModelError(f"model card {where}: 'version' must be a text, not {_show(v)}")
    if not isinstance(data.get("architecture", "clcs"), str):
        raise ModelError(f"model card {where}: 'architecture' must be a text, not {_show(data['architecture'])}")


def check_card(data, where: str) -> None:
    """Every field the engine reads from the card ``data`` has the right type, length and range
    for its architecture; raise :class:`ModelError` naming the card (``where``) and the field."""
    check_structure(data, where)
    arch = data.get("architecture", "clcs")
    try:
        _common(data)
        check = ARCHITECTURE_CHECKS.get(arch)
        if check is None:
            raise _Bad("architecture", f"{arch!r} is not one this engine runs ({', '.join(sorted(ARCHITECTURE_CHECKS))})")
        check(data)
    except _Bad as bad:
        field, problem = bad.args
        raise ModelError(f"model card {where}: {field} {problem}") from None
