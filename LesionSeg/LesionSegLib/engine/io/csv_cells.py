"""CSV cells that a spreadsheet will not run as formulas (CSV / formula injection, OWASP).

A text cell that begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is taken by
Excel, LibreOffice and Google Sheets as a formula (``=HYPERLINK(...)``, ``=cmd|...``).  Such a
cell is written with a leading apostrophe, which the spreadsheet shows as text.  Numbers (Python
``int`` / ``float``, and text that is a plain decimal number such as ``-1.5`` or ``+2e3``) are left
as they are.  A cell that already begins with an apostrophe followed by one of those characters
gets a second one, so :func:`unescape_cell` gives back exactly the original text.

    >>> safe_cell("=1+1"), safe_cell(-2.5), safe_cell("-2.5"), safe_cell("a=b")
    ("'=1+1", -2.5, '-2.5', 'a=b')
"""
from __future__ import annotations

import re

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _needs_escape(text: str) -> bool:
    if text.startswith(FORMULA_START):
        return not _NUMBER.match(text)
    return text.startswith("'") and text[1:2] != "" and text[1:].startswith(FORMULA_START) and not _NUMBER.match(text[1:])


def safe_cell(value):
    """``value`` as a CSV cell a spreadsheet shows as text (see the module notes); anything that
    is not text (numbers, None) is returned unchanged."""
    if isinstance(value, str) and _needs_escape(value):
        return "'" + value
    return value


def unescape_cell(value):
    """The original text of a cell written by :func:`safe_cell` (other values unchanged)."""
    if isinstance(value, str) and value.startswith("'") and _needs_escape(value[1:]):
        return value[1:]
    return value
