"""The package skeleton around the generated modules: pyproject, README, __init__, manifest.

Small Jinja templates in ``scmc/emit/templates`` hold the text; this module only gathers
the values. Everything is deterministic: no timestamps, no absolute paths, sorted keys.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

import scmc
from scmc.addresses import AllowList
from scmc.emit.python import comment_text, format_python

if TYPE_CHECKING:
    from scmc.build import BuildRequest, Compiled

TEMPLATES = Path(__file__).parent / "templates"
MODULE_FILES = {"model": "model", "loss": "loss", "metric": "metric", "backward": "backward"}


def _env():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["pyrepr"] = repr
    return env


def imported_roots(source: str) -> list[str]:
    """Top-level modules a Python source imports, in order of first import."""
    import ast

    roots: list[str] = []
    for node in ast.walk(ast.parse(source)):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        )
        for name in names:
            root = name.split(".")[0]
            if root and root not in roots:
                roots.append(root)
    return roots


def dependencies(sources: list[str]) -> list[str]:
    """Distributions the generated code imports (plus torch and the runtime, always)."""
    import sys

    from scmc.build import DISTRIBUTIONS

    roots: list[str] = ["torch", "scmc_runtime"]
    for source in sources:
        for root in imported_roots(source):
            if root not in roots and root not in sys.stdlib_module_names:
                roots.append(root)
    out = []
    for root in roots:
        dist, bound = DISTRIBUTIONS.get(root, (root, ""))
        out.append(f"{dist}{bound}")
    return sorted(out)


# preset keys -> TrainConfig fields (scmc/emit/train.py FIELDS)
PRESET_FIELDS = {
    "dataset": {
        "image_size": "image_size",
        "batch_size": "batch_size",
        "epochs": "epochs",
        "workers": "workers",
        "root": "data",
        "name": "timm_dataset",
    },
    "ema": {"enabled": "ema", "decay": "ema_decay", "warmup": "ema_warmup"},
    "compile": {"enabled": "compile", "mode": "compile_mode"},
}


def train_context(name: str, compiled: list["Compiled"]):
    """The context of the generated train.py, or None when the package cannot train (no
    backward or no loss)."""
    from scmc.emit.train import TrainContext

    by_role = {c.role: c for c in compiled}
    if not {"model", "loss", "backward"} <= set(by_role):
        return None
    model, loss = by_role["model"], by_role["loss"]
    metric = by_role.get("metric")
    root = model.program.module(model.program.root)
    loss_root = loss.program.module(loss.program.root)
    metric_root = metric.program.module(metric.program.root) if metric else None
    known = set(root.inputs) | set(root.outputs)
    labels = [n for n in loss_root.inputs if n not in known]
    defaults: dict[str, Any] = {}
    for role, mapping in PRESET_FIELDS.items():
        preset = by_role.get(role)
        if preset is None or not isinstance(preset.config, dict):
            continue
        if role == "dataset" and preset.config.get("kind") == "timm":
            mapping = {**mapping, "root": "cache_dir"}  # a timm dataset's root is where it is cached
        for key, field in mapping.items():
            if key in preset.config:
                defaults[field] = preset.config[key]
    if "image_size" not in defaults and model.input_shapes:
        first = model.input_shapes[root.inputs[0]]["shape"]
        defaults["image_size"] = int(first[-1])
    return TrainContext(
        package=name,
        scmc_version=scmc.__version__,
        template=model.source.display.replace("\\", "/"),
        model_inputs=list(root.inputs),
        model_outputs=list(root.outputs),
        model_structured=root.structured,
        label=labels[0] if labels else "label",
        loss_inputs=list(loss_root.inputs),
        loss_outputs=list(loss_root.outputs),
        loss_structured=loss_root.structured,
        metric_inputs=list(metric_root.inputs) if metric_root else [],
        metric_outputs=list(metric_root.outputs) if metric_root else [],
        metric_structured=metric_root.structured if metric_root else False,
        backward_losses=list(by_role["backward"].backward.losses),
        defaults=defaults,
        model_class=root.name,
    )


def predict_source(name: str, train: Any, compiled: list["Compiled"]) -> str:
    """`python -m <pkg>.predict --onnx model.onnx image.png`: ONNX Runtime, numpy and Pillow only,
    with the validation preprocessing of train.py."""
    from scmc.emit.predict import render_predict
    from scmc.emit.train import IMAGENET_MEAN, IMAGENET_STD

    defaults = train.defaults
    dataset = next((c.config for c in compiled if c.role == "dataset" and isinstance(c.config, dict)), {})
    labels = [str(i) for i in range(10)] if dataset.get("kind") == "digits" else None
    return render_predict(
        name,
        train.model_inputs[0],
        int(defaults.get("image_size", 224)),
        list(defaults.get("mean", IMAGENET_MEAN)),
        list(defaults.get("std", IMAGENET_STD)),
        labels,
        5,
    )


def class_name(c: "Compiled") -> str:
    return c.program.root if c.program is not None else c.backward.classname


def rebuild_command(request: "BuildRequest", name: str) -> str:
    parts = ["scmc", "build", str(request.parts[0].path)]
    for part in request.parts[1:]:
        parts += [f"--{part.role}", str(part.path)]
    for p in request.params:
        parts += ["-p", p]
    for k, v in request.shapes.items():
        parts += ["-s", f"{k}={','.join(str(d) for d in v['shape'])}"]
    parts += ["--name", name, "--force"]
    return " ".join(shlex.quote(p) for p in parts)


def package_files(name: str, request: "BuildRequest", compiled: list["Compiled"], allow: AllowList) -> dict[str, bytes]:
    from scmc.build import RUNTIME_REQUIREMENT, manifest

    env = _env()
    model = next(c for c in compiled if c.role == "model")
    layer_files = {stem: path for c in compiled for stem, path in c.files.items()}
    deps = dependencies(
        [c.text for c in compiled if c.text] + [p.read_text(encoding="utf-8") for p in layer_files.values()]
    )
    # the stem lands in a docstring and a TOML string: keep only plain characters of it
    stem = re.sub(r"[^\w .+-]", "_", model.source.path.stem)
    description = f"{stem} compiled by scmc into a standalone PyTorch package."
    src = f"src/{name}"
    files: dict[str, bytes] = {}
    modules = [c for c in compiled if c.role in MODULE_FILES]
    for c in modules:
        files[f"{src}/{MODULE_FILES[c.role]}.py"] = c.text.encode()
    for stem, path in sorted(layer_files.items()):
        files[f"{src}/{stem}.py"] = path.read_bytes()  # a `_file_` layer module, as the user wrote it
    imports = [(MODULE_FILES[c.role], class_name(c)) for c in modules]
    common: dict[str, Any] = {
        "name": name,
        "scmc_version": scmc.__version__,
        "version": "0.1.0",
        "description": description,
        "template": comment_text(model.source.display.replace("\\", "/")),  # shown in a `#` comment line
    }
    init = env.get_template("__init__.py.j2").render(
        **common,
        runtime_requirement=RUNTIME_REQUIREMENT,
        imports=imports,
        classes=[cls for _, cls in imports],
        model_class=class_name(model),
    )
    files[f"{src}/__init__.py"] = format_python(init).encode()
    train = train_context(name, compiled)
    files["pyproject.toml"] = (
        env.get_template("pyproject.toml.j2")
        .render(
            **common,
            distribution=name.replace("_", "-"),
            dependencies=deps,
            runtime_requirement=RUNTIME_REQUIREMENT,
            has_train=train is not None,
        )
        .encode()
    )
    root = model.program.module(model.program.root)
    shapes = sorted((model.input_shapes or {}).items())
    example = ", ".join(f"torch.randn(2, {', '.join(str(d) for d in spec['shape'])})" for _, spec in shapes) or "..."
    files["README.md"] = (
        env.get_template("README.md.j2")
        .render(
            **common,
            parameters=list(request.params),
            classes=[(c.role, class_name(c)) for c in modules],
            param_count=model.param_count,
            input_shapes=shapes,
            inputs=list(root.inputs),
            outputs=list(root.outputs),
            structured=root.structured,
            dependencies=deps,
            extra_deps=[d for d in deps if not d.startswith(("torch", "scmc-runtime"))],
            resolved=sorted((k, json.dumps(v, sort_keys=True, default=repr)) for k, v in model.params.items()),
            model_class=root.name,
            example_call=example,
            rebuild=rebuild_command(request, name),
        )
        .encode()
    )
    if train is not None:
        from scmc.emit.train import render_train

        files[f"{src}/train.py"] = render_train(train).encode()
        files[f"{src}/predict.py"] = predict_source(name, train, compiled).encode()
    files[f"{src}/manifest.json"] = (
        json.dumps(manifest(name, request, compiled, deps), indent=2, sort_keys=True) + "\n"
    ).encode()
    return files
