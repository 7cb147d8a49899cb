"""``python -m LesionSegLib.engine.cli``: the same as the ``lesionseg`` command."""
import sys

from . import main

sys.exit(main())
