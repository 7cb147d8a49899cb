"""The Slicer extension's CMake files ship what the modules need.

A Slicer build installs only what ``slicerMacroBuildScriptedModule`` is given (SCRIPTS and
RESOURCES); a file the code reads but the CMake lists miss works from the source tree and breaks
in the installed extension.  These tests read the CMake files as CMake would (explicit entries
with ``${MODULE_NAME}`` substituted, and the ``file(GLOB ...)`` / ``file(GLOB_RECURSE ...)``
patterns) and check them against the files git tracks; and the extension's icon and screenshot
URLs against files in the repository.
"""
from __future__ import annotations

import fnmatch
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULES = ("LesionSeg", "LesionSegTraining")


def _tracked(folder: str) -> list[str]:
    """Files git tracks under ``folder``, relative to it."""
    out = subprocess.run(["git", "ls-files", folder], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [line[len(folder) + 1:] for line in out.splitlines() if line.strip()]


def _cmake_lists(module: str) -> dict[str, dict]:
    """``{"MODULE_PYTHON_SCRIPTS": {"files": [...], "globs": [(pattern, recursive)]}, ...}``."""
    text = (REPO / module / "CMakeLists.txt").read_text(encoding="utf-8")
    text = re.sub(r"#[^\n]*", "", text).replace("${MODULE_NAME}", module).replace("${CMAKE_CURRENT_SOURCE_DIR}/", "")
    lists: dict[str, dict] = {}
    for name, body in re.findall(r"set\((MODULE_PYTHON_\w+)\s+(.*?)\)", text, re.S):
        lists[name] = {"files": body.split(), "globs": []}
    for kind, var, body in re.findall(r"file\((GLOB(?:_RECURSE)?)\s+(\w+)\s+(.*?)\)", text, re.S):
        patterns = [p for p in body.split() if p not in ("RELATIVE", "CONFIGURE_DEPENDS", "${CMAKE_CURRENT_SOURCE_DIR}")]
        target = re.search(r"list\(APPEND\s+(MODULE_PYTHON_\w+)\s+\$\{" + var + r"\}\)", text)
        assert target, f"{module}/CMakeLists.txt: the glob {var} is never appended to a module list"
        lists[target.group(1)]["globs"] += [(p, kind == "GLOB_RECURSE") for p in patterns]
    return lists


def _matches(path: str, pattern: str, recursive: bool) -> bool:
    folder, _, leaf = pattern.rpartition("/")
    if recursive:  # CMake's GLOB_RECURSE: the leaf pattern in the folder or any folder below it
        return path.startswith(folder + "/") and fnmatch.fnmatch(path.rpartition("/")[2], leaf)
    return path.rpartition("/")[0] == folder and fnmatch.fnmatch(path.rpartition("/")[2], leaf)


def _shipped(lists: dict, key: str, path: str) -> bool:
    entry = lists[key]
    return path in entry["files"] or any(_matches(path, p, r) for p, r in entry["globs"])


@pytest.mark.parametrize("module", MODULES)
def test_every_module_file_is_installed_and_every_listed_file_exists(module):
    lists = _cmake_lists(module)
    assert set(lists) == {"MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"}
    text = (REPO / module / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule(" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    tracked = _tracked(module)
    for key in lists:  # every explicit entry names a tracked file (a typo would fail the Slicer build)
        missing = [f for f in lists[key]["files"] if f not in tracked]
        assert not missing, f"{module}/CMakeLists.txt {key} lists files that do not exist: {missing}"
    lib = f"{module}Lib/"
    code = [f for f in tracked if f.endswith(".py") and (f.startswith(lib) or f == f"{module}.py")]
    unlisted = [f for f in code if not _shipped(lists, "MODULE_PYTHON_SCRIPTS", f)]
    assert not unlisted, f"{module}: Python files a Slicer build would not install: {unlisted}"
    data = [f for f in tracked if f.startswith((lib, "Resources/UI/", "Resources/Icons/")) and not f.endswith(".py")]
    unlisted = [f for f in data if not _shipped(lists, "MODULE_PYTHON_RESOURCES", f)]
    assert not unlisted, f"{module}: data files a Slicer build would not install: {unlisted}"
    assert f"Resources/UI/{module}.ui" in lists["MODULE_PYTHON_RESOURCES"]["files"]


def test_the_packaging_check_sees_a_missing_file():
    """The check itself: a model file under an unlisted suffix, or a Lib subpackage outside the
    globs, is reported (so a pass above means something)."""
    lists = _cmake_lists("LesionSeg")
    assert _shipped(lists, "MODULE_PYTHON_RESOURCES", "LesionSegLib/models/sts-clcs/card.json")
    assert _shipped(lists, "MODULE_PYTHON_RESOURCES", "LesionSegLib/models/gates/sts-slab-gate/card.json")
    assert not _shipped(lists, "MODULE_PYTHON_RESOURCES", "LesionSegLib/models/sts-clcs/segmenter.onnx")
    assert _shipped(lists, "MODULE_PYTHON_SCRIPTS", "LesionSegLib/engine/learn/finetune_checks.py")
    assert not _shipped(lists, "MODULE_PYTHON_SCRIPTS", "LesionSegLib/widgets/table.py")
    assert not _shipped(lists, "MODULE_PYTHON_RESOURCES", "LesionSegLib/requirements-new.txt")


def test_extension_metadata_names_files_in_the_repository():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    meta = dict(re.findall(r'set\((EXTENSION_\w+)\s+"([^"]*)"\)', text))
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert meta.get(key, "").strip(), f"CMakeLists.txt: {key} is empty"
    urls = [meta["EXTENSION_ICONURL"], *meta["EXTENSION_SCREENSHOTURLS"].split()]
    prefix = meta["EXTENSION_HOMEPAGE"].replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    for url in urls:
        assert url.startswith(prefix), url
        assert (REPO / url[len(prefix):]).is_file(), f"{url} names a file the repository lacks"
    assert len(urls) >= 3
    assert [f"add_subdirectory({m})" in text for m in MODULES] == [True, True]
