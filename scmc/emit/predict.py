"""The torch-free inference entry point, ``<pkg>/predict.py``.

:func:`render_predict` fills ``templates/predict.py.j2`` with the package's input name and the
validation preprocessing of training (image size, mean, std) and, when known, the class
labels; for an image-table model (an image and a row of features) also the features input, whose
values are given with ``--features`` (one row per image), and every output is printed. The
generated file runs as ``python -m <pkg>.predict --onnx model.onnx image.png`` with
ONNX Runtime, NumPy and Pillow only: it imports no torch, so the package's ``__init__`` must
not either for ``python -m`` to stay torch-free.
"""

from __future__ import annotations

from typing import Sequence

import scmc

TEMPLATE = "predict.py.j2"
ALLOWED_IMPORTS = ("argparse", "json", "os", "stat", "sys", "typing", "warnings", "numpy", "onnxruntime", "PIL")


def render_predict(
    package: str,
    input_name: str,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    class_labels: Sequence[str] | None,
    topk: int,
    features_name: str | None = None,
    num_features: int = 0,
) -> str:
    """Black-formatted source of ``<package>/predict.py``."""
    from scmc.emit.jinja import environment as _env
    from scmc.emit.jinja import imported_roots
    from scmc.emit.python import format_python

    if not package.isidentifier():
        raise ValueError(f"package name {package!r} is not a Python identifier")
    if not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, not {image_size!r}")
    if len(mean) != len(std) or not mean:
        raise ValueError("mean and std need one value per channel")
    if topk < 1:
        raise ValueError("topk must be at least 1")
    if features_name is not None and (not str(features_name).isidentifier() or num_features < 1):
        raise ValueError("an image-table model needs a features input name and num_features >= 1")
    labels = None if class_labels is None else [str(label) for label in class_labels]
    source = (
        _env()
        .get_template(TEMPLATE)
        .render(
            scmc_version=scmc.__version__,
            package=package,
            input_name=str(input_name),
            image_size=image_size,
            mean=tuple(float(m) for m in mean),
            std=tuple(float(s) for s in std),
            class_labels=labels,
            topk=int(topk),
            features_name=features_name,
            num_features=int(num_features),
        )
    )
    formatted = format_python(source)
    stray = [root for root in imported_roots(formatted) if root not in ALLOWED_IMPORTS]
    if stray:  # a guard for template edits: predict.py must run without torch
        raise AssertionError(f"predict.py imports {stray}; it may only import {ALLOWED_IMPORTS}")
    return formatted
