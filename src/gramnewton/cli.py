"""Entry point of the ``gramnewton`` command: the commands live in :mod:`gramnewton.lab`.

This module imports nothing beyond the standard library until the lab's dependencies are known
to be installed, so that a core-only install answers with one line naming the extra.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.util import find_spec

# import name -> distribution name of the lab extra's dependencies
LAB_REQUIREMENTS = {
    "numpy": "numpy",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "PIL": "Pillow",
    "sklearn": "scikit-learn",
    "mlxtend": "mlxtend",
    "tomli_w": "tomli-w",
}


def missing_lab_requirements() -> list[str]:
    """Distribution names of the lab extra that are not installed."""
    return [dist for module, dist in LAB_REQUIREMENTS.items() if find_spec(module) is None]


def main(argv: Sequence[str] | None = None) -> int:
    missing = missing_lab_requirements()
    if missing:
        print(
            f"error: the gramnewton command needs the lab extra ({', '.join(missing)} missing): "
            "pip install 'gramnewton[lab]'",
            file=sys.stderr,
        )
        return 2
    from .allocator import tune_allocator

    tune_allocator()  # explicit here, never at import; GRAMNEWTON_TUNE_ALLOCATOR=0 turns it off
    from .lab.cli import main as lab_main

    return lab_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
