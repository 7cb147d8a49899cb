"""Stand-in for ``slicer.i18n``: Slicer's translation functions, returning the source text
(the English strings are the translation source in Slicer too)."""


def tr(text: str) -> str:
    return text


def translate(context: str, text: str) -> str:
    return text
