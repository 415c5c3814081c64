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
    from scmc.build import recorded_path
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
        template=recorded_path(model.source.path),
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
    from scmc.build import recorded_path

    parts = ["scmc", "build", recorded_path(request.parts[0].path)]
    for part in request.parts[1:]:
        parts += [f"--{part.role}", recorded_path(part.path)]
    for p in request.params:
        parts += ["-p", p]
    for k, v in request.shapes.items():
        parts += ["-s", f"{k}={','.join(str(d) for d in v['shape'])}"]
    parts += ["--name", name, "--force"]
    return " ".join(shlex.quote(p) for p in parts)


def package_files(name: str, request: "BuildRequest", compiled: list["Compiled"], allow: AllowList) -> dict[str, bytes]:
    from scmc.build import RUNTIME_REQUIREMENT, manifest, recorded_path

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
        "template": comment_text(recorded_path(model.source.path)),  # shown in a `#` comment line
    }
    init = env.get_template("__init__.py.j2").render(
        **common, runtime_requirement=RUNTIME_REQUIREMENT, imports=imports, classes=[cls for _, cls in imports]
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

        check_keyword_inputs(compiled)
        files[f"{src}/train.py"] = render_train(train).encode()
        files[f"{src}/predict.py"] = predict_source(name, train, compiled).encode()
    check_class_names(files, src, [cls for _, cls in imports])
    files[f"{src}/manifest.json"] = (
        json.dumps(manifest(name, request, compiled, deps), indent=2, sort_keys=True) + "\n"
    ).encode()
    return files


# --------------------------------------------------------------------------- names the package relies on


def _name_span(c: "Compiled", name: str, key: str):
    """Where the template names `name`: its entry under KEY (INPUTS, OUTPUTS), else the first line
    that spells it (a FLOW step, perhaps inside a Jinja block), else the file."""
    from scmc.diagnostics import Span
    from scmc.load import LList

    listed = c.source.data.get(key)
    if isinstance(listed, LList) and name in listed:
        return listed.item_span(listed.index(name))
    word = re.compile(rf"(?<!\w){re.escape(name)}(?!\w)")
    for number, line in enumerate(c.source.text.splitlines(), 1):
        match = word.search(line)
        if match and not line.lstrip().startswith("#"):
            return Span(c.source.display, number, match.start() + 1)
    return Span(c.source.display, 1, 1)


def forward_parameters(text: str, classname: str) -> list[str]:
    """The parameter names (after self) of `classname.forward` in a generated module."""
    import ast

    for node in ast.parse(text).body:
        if isinstance(node, ast.ClassDef) and node.name == classname:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "forward":
                    return [a.arg for a in item.args.args[1:]]
    return []


def check_keyword_inputs(compiled: list["Compiled"]) -> None:
    """train.py calls the loss and the metric with keyword arguments named after their INPUTS:
    an input the emitter had to rename (it would shadow a name the generated code reads, or
    Python treats it specially) would be a TypeError at the first training step."""
    from scmc.diagnostics import Diagnostics

    diags = Diagnostics()
    for c in compiled:
        if c.role not in ("loss", "metric") or c.program is None:
            continue
        root = c.program.module(c.program.root)
        if "__debug__" in root.outputs:  # train.py assigns each output to a variable of its name
            diags.error(
                "E0932",
                f"{c.role} output `__debug__` cannot be a variable of the generated train.py: Python refuses to bind it",
                _name_span(c, "__debug__", "OUTPUTS"),
                "rename the output, e.g. to `debug`",
            )
        emitted = forward_parameters(c.text, root.name)
        for name, param in zip(root.inputs, emitted):
            if name != param:
                diags.error(
                    "E0930",
                    f"{c.role} input `{name}` cannot be a keyword argument of the generated `{root.name}.forward` "
                    f"(it would be `{param}`: the name is taken by Python or by the generated code), and train.py "
                    "passes each input by name",
                    _name_span(c, name, "INPUTS"),
                    f"rename `{name}` here and where the {c.role} reads it, e.g. to `{param.rstrip('_')}_in`",
                )
    diags.raise_if_any()


def check_class_names(files: dict[str, bytes], src: str, classes: list[str]) -> None:
    """The generated __init__.py and train.py must see each class they import as that class: not
    bound again at module level (`-c TrainConfig`), nor shadowed in a function that constructs it
    or reads its attributes (`-c net` in train.py's `main`, which runs `net = net()`). A local of
    the same name in a function that never uses the class (a loss output `Loss`) is harmless."""
    import ast
    import symtable

    from scmc.diagnostics import fail

    for filename in ("__init__.py", "train.py"):
        data = files.get(f"{src}/{filename}")
        if data is None:
            continue
        source = data.decode()
        tree = ast.parse(source)
        bound: dict[str, int] = {}
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.asname or a.name.split(".")[0] for a in node.names]
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.Try):
                names = [
                    a.asname or a.name.split(".")[0] for n in node.body if isinstance(n, ast.Import) for a in n.names
                ]
            else:
                names = []
            for n in names:
                bound[n] = bound.get(n, 0) + 1
        functions = {
            (n.name, n.lineno): n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        }
        shadowed: set[str] = set()
        stack = [symtable.symtable(source, filename, "exec")]
        while stack:
            table = stack.pop()
            stack.extend(table.get_children())
            node = functions.get((table.get_name(), table.get_lineno()))
            if table.get_type() != "function" or node is None:
                continue
            local = {sym.get_name() for sym in table.get_symbols() if sym.is_assigned() or sym.is_parameter()}
            for use in ast.walk(node):
                target = (
                    use.func if isinstance(use, ast.Call) else use.value if isinstance(use, ast.Attribute) else None
                )
                if isinstance(target, ast.Name) and target.id in local:
                    shadowed.add(target.id)
        imports_classes = filename == "train.py"  # __init__.py loads them lazily, by name
        for cls in classes:
            clash = bound.get(cls, 0) > (1 if imports_classes else 0)
            if clash or cls in shadowed:
                raise fail(
                    "E0906",
                    f"class name `{cls}` is not usable: the generated {filename} uses `{cls}` for "
                    + ("something else" if clash else "a local variable"),
                    hint="-c/--classname takes another name, e.g. Model",
                )
