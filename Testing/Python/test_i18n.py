"""The user-visible texts of the two modules' widget layer are translatable (Slicer's i18n
convention, Slicer 5.4+): ``from slicer.i18n import tr as _``, every text set on a widget or shown
in a dialog is ``_("...")`` or ``_("... {value} ...").format(value=...)``, never a bare literal or an
f-string.  Checked statically, by parsing the files with ``ast`` (no Slicer, no Qt needed).

Texts computed elsewhere (a variable, ``str(exc)``, a function of the MRML logic) are not checked:
the logic and the engine compute their texts without Qt and are out of this check's scope.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WIDGET_FILES = [
    "LesionSeg/LesionSeg.py",
    "LesionSeg/LesionSegLib/widget_support.py",
    "LesionSeg/LesionSegLib/panel_sync.py",
    "LesionSegTraining/LesionSegTraining.py",
    "LesionSegTraining/LesionSegTrainingLib/panel_job.py",
]
SETTERS = {"setText", "setToolTip", "setWindowTitle", "setPlaceholderText"}
DIALOGS = {"errorDisplay", "warningDisplay", "infoDisplay", "confirmOkCancelDisplay", "confirmYesNoDisplay"}
DIALOG_TEXT_KEYWORDS = {"text", "windowTitle"}


def _untranslated(node) -> bool:
    """Whether the expression ``node`` shows a literal text that does not go through ``_``: a
    string literal with a letter in it (``""``, ``" "`` have nothing to translate), an f-string,
    or such a literal in a conditional, a concatenation or a ``"...".format(...)``."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and any(c.isalpha() for c in node.value)
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.IfExp):
        return _untranslated(node.body) or _untranslated(node.orelse)
    if isinstance(node, ast.BinOp):
        return _untranslated(node.left) or _untranslated(node.right)
    if isinstance(node, ast.BoolOp):
        return any(_untranslated(v) for v in node.values)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        return _untranslated(node.func.value)  # _("...").format(...) is fine, "...".format(...) is not
    return False  # _("..."), a variable, or a call computing the text elsewhere


def _is_slicer_util(node) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "util" and isinstance(node.value, ast.Name)
            and node.value.id == "slicer")


def _text_arguments(tree):
    """(line, what, text expression) of every widget text setter and slicer.util dialog call."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        name = node.func.attr
        if name in SETTERS and node.args:
            yield node.lineno, name, node.args[0]
        elif name in DIALOGS and _is_slicer_util(node.func.value):
            if node.args:
                yield node.lineno, name, node.args[0]
            for kw in node.keywords:
                if kw.arg in DIALOG_TEXT_KEYWORDS:
                    yield node.lineno, f"{name}({kw.arg}=)", kw.value


def _parse(relpath):
    return ast.parse((ROOT / relpath).read_text(encoding="utf-8"), filename=relpath)


@pytest.mark.parametrize("relpath", WIDGET_FILES)
def test_widget_texts_and_dialogs_are_translatable(relpath):
    tree = _parse(relpath)
    found = list(_text_arguments(tree))
    assert found, f"{relpath}: no widget text or dialog call found (did the check break?)"
    bad = [f"{relpath}:{line}: {what}({ast.unparse(arg)})" for line, what, arg in found if _untranslated(arg)]
    assert not bad, "texts shown without _() (wrap them: _(\"...\") or _(\"... {x}\").format(x=...)):\n" + "\n".join(bad)


@pytest.mark.parametrize("relpath", WIDGET_FILES)
def test_translated_texts_are_plain_literals(relpath):
    """``_`` gets one string literal (what the translation tools extract): no f-string, no variable,
    no concatenation inside ``_()``; and ``_`` is Slicer's ``tr``."""
    tree = _parse(relpath)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "_"]
    assert calls, f"{relpath}: no _() call"
    bad = [f"{relpath}:{n.lineno}: {ast.unparse(n)}" for n in calls
           if n.keywords or len(n.args) != 1 or not (isinstance(n.args[0], ast.Constant) and isinstance(n.args[0].value, str))]
    assert not bad, "_() must get a single string literal:\n" + "\n".join(bad)
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "slicer.i18n"
               and any(a.name == "tr" and a.asname == "_" for a in n.names)]
    assert imports, f"{relpath}: _ is not imported as 'from slicer.i18n import tr as _'"


def test_the_check_catches_untranslated_texts():
    tree = ast.parse('label.setText("Done.")\nlabel.setToolTip(f"{n} files")\n'
                     'slicer.util.errorDisplay(_("Failed: {e}").format(e=e), windowTitle="LesionSeg")\n'
                     'label.setText(_("A") if ok else "B")\nlabel.setText("")\nlabel.setText(message)\n'
                     'slicer.util.warningDisplay(_("W"))\nlabel.setText("{} files".format(n))\n')
    flagged = sorted(line for line, _what, arg in _text_arguments(tree) if _untranslated(arg))
    assert flagged == [1, 2, 3, 4, 8]
