"""Import an optional dependency, or say which extra to install."""

import importlib
from types import ModuleType

# import name -> the distribution on the package index (scmc-runtime itself may be on none: it
# travels as a wheel beside the generated package, see `scmc wheel`)
DISTRIBUTIONS = {"PIL": "Pillow", "sklearn": "scikit-learn"}


def install_hint(module: str, extra: str) -> str:
    root = module.split(".")[0]
    return (
        f"pip install {DISTRIBUTIONS.get(root, root)} (or install the package with its [{extra}] extra, "
        f"which brings scmc-runtime[{extra}])"
    )


def require(module: str, purpose: str, extra: str) -> ModuleType:
    """``importlib.import_module(module)``, with an install hint when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs the optional dependency {module.split('.')[0]!r}: {install_hint(module, extra)}"
        ) from error
