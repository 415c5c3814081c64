"""Class labels and the preprocessing recorded with an export (the checkpoint's ``config``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError

from scmc.diagnostics import CompileError, Diagnostic, Span
from scmc.export.checkpoint import _is_state_dict
from scmc.export.common import _err, _short
from scmc.export.package import MAX_LABELS_BYTES, PackageInfo, _problems, read_bounded


class TrainingConfig(BaseModel):
    """The keys export reads from a checkpoint's ``config`` (the generated train.py's TrainConfig).

    Lax about containers (a checkpoint may hold tuples), strict about what is in them.
    """

    model_config = ConfigDict(extra="allow")

    image_size: Annotated[StrictInt, Field(gt=0)] | None = None
    mean: (
        Annotated[list[Annotated[StrictFloat, Field(allow_inf_nan=False)]], Field(min_length=1, max_length=64)] | None
    ) = None
    std: (
        Annotated[list[Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False)]], Field(min_length=1, max_length=64)]
        | None
    ) = None
    data: StrictStr | None = None
    timm_dataset: StrictStr | None = None
    data_pipeline: StrictStr | None = None
    crop_pct: Annotated[StrictFloat, Field(gt=0, le=1)] | None = None
    interpolation: StrictStr | None = None


def read_labels(labels_file: Path) -> list[str]:
    """The non-blank lines of a ``--labels`` file (a regular UTF-8 file of at most MAX_LABELS_BYTES)."""
    hint = "--labels takes a UTF-8 text file, one class label per line"
    data = read_bounded(Path(labels_file), MAX_LABELS_BYTES, "E1110", "the labels file", hint)
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise _err(
            "E1110", f"the labels file `{labels_file}` is not UTF-8 text: {_short(exc)}", labels_file, hint
        ) from None
    return [line.strip() for line in lines if line.strip()]


def class_labels(
    info: PackageInfo, ckpt: Any, labels_file: Path | None, num_outputs: int | None
) -> tuple[list[str] | None, str]:
    """Class labels and where they came from, or ``(None, reason)``."""
    labels: list[str] | None = None
    source = ""
    if labels_file is not None:
        labels, source = read_labels(labels_file), str(labels_file)
    elif isinstance(ckpt, dict) and _is_str_list(ckpt.get("classes")):
        labels, source = list(ckpt["classes"]), "checkpoint `classes`"
    else:
        dataset = (info.manifest.get("presets") or {}).get("dataset") or {}
        config = _config(ckpt)
        if _is_str_list(dataset.get("classes")):
            labels, source = list(dataset["classes"]), "manifest presets.dataset.classes"
        elif dataset.get("kind") == "digits" and not config.get("data") and not config.get("timm_dataset"):
            # prepare_digits writes one folder per digit and ImageFolder sorts them: "0".."9".
            labels, source = [str(i) for i in range(10)], "the digits data set (class folders 0-9)"
    if labels is None:
        return None, "unknown (pass --labels FILE, one label per line)"
    if num_outputs is not None and len(labels) != num_outputs:
        return None, f"ignored {source}: {len(labels)} labels for {num_outputs} outputs"
    return labels, source


def _is_str_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, str) for v in value)


def _config(ckpt: Any) -> dict[str, Any]:
    """The training configuration a checkpoint of the generated train.py carries (``config``), as checked
    by :func:`check_checkpoint_config`."""
    return ckpt["config"] if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) else {}


def check_checkpoint_config(ckpt: Any, path: Path) -> None:
    """The checkpoint's ``config`` and ``classes``, where present, have the types export relies on; else E1115."""
    if not isinstance(ckpt, dict) or _is_state_dict(ckpt):
        return
    problems: list[tuple[str, str]] = []
    config = ckpt.get("config")
    if config is not None and not isinstance(config, dict):
        problems.append(("config", f"should be a mapping, not a {type(config).__name__}"))
    elif isinstance(config, dict):
        try:
            TrainingConfig.model_validate(config)
        except ValidationError as exc:
            problems += _problems(exc, "config.")
    classes = ckpt.get("classes")
    if classes is not None and not (_is_str_list(classes) and all(len(c) <= 1000 for c in classes)):
        problems.append(("classes", "should be a list of class names (strings)"))
    if problems:
        raise CompileError(
            [
                Diagnostic(
                    "E1115",
                    f"checkpoint `{path}`: `{key}`: {message}",
                    Span(str(path)),
                    "the generated train.py writes these keys; re-save the checkpoint with the right types, "
                    "or save {'model': state_dict} alone",
                )
                for key, message in problems
            ]
        )


def preprocessing(info: PackageInfo, ckpt: Any, input_shape: list[int]) -> dict[str, Any]:
    """How validation in training fed images to the model (scmc_runtime.data.ImageTransform).

    The size is the exported input's height and width (the training image size when the
    checkpoint records it, see :func:`model_inputs`); mean and std come from the checkpoint's
    training config, else the package's dataset preset, else ImageNet's. A run with timm's
    pipeline (``data_pipeline: timm``) validated with timm's eval transform: its ``crop_pct`` and
    ``interpolation`` are recorded too, and predict.py resizes and center-crops as timm does.
    """
    from_config = _config(ckpt)
    dataset = (info.manifest.get("presets") or {}).get("dataset") or {}
    spatial = [int(d) for d in input_shape[1:]]
    size: Any = (spatial[0] if len(set(spatial)) == 1 else spatial) if spatial else None
    mean = from_config.get("mean") or dataset.get("mean") or [0.485, 0.456, 0.406]
    std = from_config.get("std") or dataset.get("std") or [0.229, 0.224, 0.225]
    source = (
        "checkpoint config"
        if from_config.get("mean")
        else "manifest presets" if dataset.get("mean") else "ImageNet defaults"
    )
    recorded: dict[str, Any] = {
        "image_size": size,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "color": "RGB",
        "scale": "1/255",
        "resize": "bilinear, align_corners=False, antialias=True (torch.nn.functional.interpolate)",
        "mean_std_source": source,
    }
    if from_config.get("data_pipeline") == "timm":
        crop_pct = float(from_config.get("crop_pct") or 0.875)  # TrainConfig's default
        interpolation = str(from_config.get("interpolation") or "bicubic")
        recorded["crop_pct"] = crop_pct
        recorded["interpolation"] = interpolation
        recorded["resize"] = (
            f"timm eval: shorter side to floor(image_size / {crop_pct}) ({interpolation}, Pillow), center crop"
        )
    return recorded
