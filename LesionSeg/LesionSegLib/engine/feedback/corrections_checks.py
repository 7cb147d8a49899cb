"""Checks of one imported corrections row (see :mod:`.corrections_exchange`).

The same rules as a decisions import (:mod:`.exchange`): text fields are text, short and without
control characters (:data:`.exchange.TEXT_LIMITS`); numbers are finite and in range; the time is
an ISO-8601 time not later than now plus :data:`.exchange.CLOCK_SKEW`; the image geometry is what
:func:`.grid.grid_image` and fine-tuning need (finite origin, positive spacing, a rotation).
Every problem is a :class:`~.schema.FeedbackStoreError` of one line naming the row.
"""
from __future__ import annotations

import datetime as _dt
import json
import math

import numpy as np

from . import corrections as cr
from .exchange import _CONTROL, _UID, CLOCK_SKEW, TEXT_LIMITS, RowError, _number, _text
from .schema import FeedbackStoreError, parse_time

#: text limits of the corrections columns that a decisions export does not have
LIMITS = {**TEXT_LIMITS, "target_key": 64, "proposal_key": 64, "codec": 40, "record": 20, "kind": 20,
          "shape": 100, "geometry": 4096, "bbox": 1024}


def fail(where: str, exc: Exception) -> FeedbackStoreError:
    return FeedbackStoreError(f"{where}: {exc}")


def text(r: dict, key: str, where: str, required: bool = False) -> str:
    """A text field of row ``r`` (``""`` when empty and not ``required``): the decisions' limits
    for their columns, :data:`LIMITS` for the corrections' own."""
    try:
        return _text(lambda k: r.get(key), key, required, {**LIMITS, **TEXT_LIMITS})
    except RowError as exc:
        raise fail(where, exc) from None


def number(r: dict, key: str, where: str, lo: float, hi: float, integer: bool = False, required: bool = False):
    """A number field of row ``r`` (None when empty and not ``required``)."""
    v = r.get(key)
    if (v is None or v == "") and not required:
        return None
    try:
        x = _number(v, key, lo, hi, default=None)
    except RowError as exc:
        raise fail(where, exc) from None
    if integer:
        if x != int(x):
            raise FeedbackStoreError(f"{where}: '{key}' = {x:g} is not an integer")
        return int(x)
    return x


def decided_at(r: dict, where: str, now: _dt.datetime) -> str:
    """The row's ``decided_at``: an ISO-8601 time, not in the future (a future-dated or unreadable
    time would otherwise win every "newer row" comparison)."""
    t_text = text(r, "decided_at", where, required=True).strip()
    t = parse_time(t_text)
    if t is None:
        raise FeedbackStoreError(f"{where}: decided_at {t_text[:40]!r} is not an ISO-8601 time")
    if t > now + CLOCK_SKEW:
        raise FeedbackStoreError(f"{where}: decided_at {t_text} is later than now ({now.isoformat(timespec='seconds')})")
    return t_text


def uid(r: dict, where: str) -> str | None:
    u = text(r, "uid", where)
    if u and not _UID.match(u):
        raise FeedbackStoreError(f"{where}: 'uid' is not a plain token")
    return u or None


def _triple(g: dict, key: str, where: str, lo: float, hi: float, integer: bool = False, n: int = 3) -> list:
    v = g.get(key)
    ok = isinstance(v, list) and len(v) == n and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and lo <= x <= hi
        and (not integer or float(x) == int(x)) for x in v)
    if not ok:
        raise FeedbackStoreError(f"{where}: image geometry '{key}' is not {n} {'integers' if integer else 'finite numbers'} "
                                 f"in [{lo:g}, {hi:g}]")
    return [int(x) for x in v] if integer else [float(x) for x in v]


def geometry(r: dict, where: str) -> str:
    """The image row's geometry (JSON text) after checking what the model grid needs."""
    raw = text(r, "geometry", where, required=True)
    try:
        g = json.loads(raw, parse_constant=lambda c: float("nan"))
    except ValueError:
        raise FeedbackStoreError(f"{where}: image geometry is not JSON") from None
    if not isinstance(g, dict):
        raise FeedbackStoreError(f"{where}: image geometry is not a JSON object")
    _triple(g, "origin_lps", where, -1e6, 1e6)
    _triple(g, "spacing_zyx", where, 1e-3, 1e3)
    d = _triple(g, "direction", where, -1.001, 1.001, n=9)
    if not 0.99 < abs(float(np.linalg.det(np.reshape(d, (3, 3))))) < 1.01:
        raise FeedbackStoreError(f"{where}: image geometry 'direction' is not a rotation")
    for key in ("input_size_xyz", "box_lo_zyx", "box_hi_zyx"):
        if key in g:
            _triple(g, key, where, 0, 100_000, integer=True)
    return raw


def shape(r: dict, where: str) -> list[int]:
    raw = text(r, "shape", where, required=True)
    try:
        s = json.loads(raw)
        ok = isinstance(s, list) and len(s) == 3 and all(isinstance(v, int) and not isinstance(v, bool) for v in s)
    except ValueError:
        ok = False
    if not ok or min(s) < 1 or int(np.prod(s, dtype=np.int64)) > cr.MAX_IMAGE_VOXELS:
        raise FeedbackStoreError(f"{where}: image shape {raw[:40]!r} is not three sizes within {cr.MAX_IMAGE_VOXELS} voxels")
    return [int(v) for v in s]


def bbox(r: dict, where: str, image_shape) -> list:
    raw = text(r, "bbox", where, required=True)
    try:
        b = json.loads(raw)
    except ValueError:
        b = None
    ok = (isinstance(b, list) and len(b) == 2 and all(isinstance(t, list) and len(t) == 3 for t in b)
          and all(isinstance(v, int) and not isinstance(v, bool) for t in b for v in t))
    if not ok:
        raise FeedbackStoreError(f"{where}: mask box {raw[:60]!r} is not two triples of voxel indices")
    if not all(0 <= a < c <= s for a, c, s in zip(b[0], b[1], image_shape)):
        raise FeedbackStoreError(f"{where}: mask box {raw[:60]} lies outside its image {list(image_shape)}")
    return b


def plain_key(r: dict, key: str, where: str, required: bool = False) -> str:
    """A key-like text (target / proposal key): short, printable, no control characters."""
    v = text(r, key, where, required)
    if v and (_CONTROL.search(v) or v != v.strip()):
        raise FeedbackStoreError(f"{where}: '{key}' is not a plain key")
    return v
