"""Error types raised by the engine.

Every problem with user input is raised as :class:`InputError`, whose message names the
file (when known) and the problem in one line, so the CLI and the Slicer module can show it
as-is.
"""


class LesionSegError(Exception):
    """Base class of all errors the engine raises on purpose."""


class InputError(LesionSegError, ValueError):
    """A bad input image (corrupt file, wrong dimensionality, NaNs, non-CT range...)."""

    def __init__(self, problem: str, source: str | None = None):
        self.problem = problem
        self.source = source
        super().__init__(f"{source}: {problem}" if source else problem)


class ModelError(LesionSegError):
    """A model that cannot be used: missing file, checksum mismatch, unknown architecture."""


class CancelledError(LesionSegError):
    """Raised inside the pipeline when the caller asked to cancel."""


#: what native libraries (ITK, OpenVINO, ONNX Runtime, the C++ runtime) say when an allocation fails
OUT_OF_MEMORY_TEXTS = ("allocate", "can't alloc", "bad_alloc", "out of memory")


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` (any library's error) reports a failed memory allocation: the machine's
    memory, not a damaged file or model."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or any(t in text for t in OUT_OF_MEMORY_TEXTS)
