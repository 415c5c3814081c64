"""The package skeleton around the generated modules: pyproject, README, __init__, manifest.

Small Jinja templates in ``scmc/emit/templates`` hold the text; this module only gathers
the values. Everything is deterministic: no timestamps, no absolute paths, sorted keys.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from typing import TYPE_CHECKING, Any

import scmc
from scmc.emit.jinja import environment as _env
from scmc.emit.jinja import imported_roots
from scmc.emit.python import LINE_LENGTH, comment_text, format_python
from scmc.load import recorded_path
from scmc.passes.stages import MODEL_FORMAT

if TYPE_CHECKING:
    from scmc.link import Compiled, PackageDef

MODULE_FILES = {"model": "model", "loss": "loss", "metric": "metric", "backward": "backward"}
RUNTIME_REQUIREMENT = ">=0.1.0,<0.2"

# import root -> (distribution, lower bound) for the generated pyproject
DISTRIBUTIONS = {
    "torch": ("torch", ">=2.4"),
    "torchvision": ("torchvision", ">=0.19"),
    "timm": ("timm", ">=1.0"),
    "scmc_runtime": ("scmc-runtime", RUNTIME_REQUIREMENT),
}


def dependencies(sources: list[str]) -> list[str]:
    """Distributions the generated code imports (plus torch and the runtime, always)."""
    import sys

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


def train_context(pkg: "PackageDef"):
    """The context of the generated train.py, or None when the package cannot train (no
    backward or no loss)."""
    from scmc.emit.backward import compiled_settings
    from scmc.emit.train import TrainContext

    training = pkg.training
    if training is None:
        return None
    assert pkg.loss is not None  # a package trains only with a loss
    bdef = pkg.backward.backward if pkg.backward is not None else None
    root, loss_root = pkg.model.root, pkg.loss.root
    metric_root = pkg.metric.root if pkg.metric is not None else None
    return TrainContext(
        package=pkg.name,
        scmc_version=scmc.__version__,
        template=recorded_path(pkg.model.source.path),
        model_inputs=list(root.inputs),
        model_outputs=list(root.outputs),
        model_structured=root.structured,
        label=training.label,
        loss_inputs=list(loss_root.inputs),
        loss_outputs=list(loss_root.outputs),
        loss_structured=loss_root.structured,
        metric_inputs=list(metric_root.inputs) if metric_root else [],
        metric_outputs=list(metric_root.outputs) if metric_root else [],
        metric_structured=metric_root.structured if metric_root else False,
        backward_losses=list(training.backward_losses),
        defaults=dict(training.defaults),
        model_class=root.name,
        soft_targets=training.soft_targets,
        target=training.target,
        num_features=training.num_features,
        num_targets=training.num_targets,
        backward=compiled_settings(bdef) if bdef is not None else {},
        jsd_logits=training.jsd_logits,
        jsd_loss=training.jsd_loss,
        jsd_problem=training.jsd_problem,
    )


def predict_source(pkg: "PackageDef", train: Any) -> str:
    """`python -m <pkg>.predict --onnx model.onnx image.png`: ONNX Runtime, numpy and Pillow only,
    with the validation preprocessing of train.py."""
    from scmc.emit.predict import render_predict
    from scmc.emit.train import IMAGENET_MEAN, IMAGENET_STD

    defaults = train.defaults
    return render_predict(
        pkg.name,
        train.model_inputs[0],
        int(defaults.get("image_size", 224)),
        list(defaults.get("mean", IMAGENET_MEAN)),
        list(defaults.get("std", IMAGENET_STD)),
        list(pkg.class_labels) if pkg.class_labels is not None else None,
        5,
        train.model_inputs[1] if train.target else None,
        train.num_features,
    )


def class_name(c: "Compiled") -> str:
    if c.program is not None:
        return c.program.root
    assert c.backward is not None  # a compiled part is a layer graph or a backward template
    return c.backward.classname


def rebuild_command(pkg: "PackageDef") -> str:
    build, name = pkg.build, pkg.name
    parts = ["scmc", "build", recorded_path(build.parts[0][1])]
    for role, path in build.parts[1:]:
        parts += [f"--{role}", recorded_path(path)]
    for p in build.params:
        parts += ["-p", p]
    for k, v in build.shapes:
        parts += ["-s", f"{k}={','.join(str(d) for d in v['shape'])}"]
    parts += ["--name", name, "--force"]
    return " ".join(shlex.quote(p) for p in parts)


def _short(value: Any) -> str:
    """A hyperparameter as one readable line: JSON for containers, repr-free plain scalars."""
    text = json.dumps(value, sort_keys=True, default=repr) if isinstance(value, (dict, list, tuple)) else str(value)
    return text.replace("|", "\\|").replace("\n", "\\n")


def _bound_rows(prefix: str, kwargs: tuple[tuple[str, Any], ...]) -> list[tuple[str, str]]:
    """One row per bound argument, a mapping argument (optimizer_kwargs) one row per key."""
    rows = []
    for key, value in kwargs:
        items = sorted(value.items()) if isinstance(value, dict) else [(None, value)]
        for sub, item in items:
            rows.append((f"{prefix}{key}" + (f".{sub}" if sub is not None else ""), f"`{_short(item)}`"))
    return rows


def hyperparameters(train: Any, compiled: list["Compiled"]) -> list[tuple[str, str]]:
    """(what, value) rows of the model card: the defaults of train.py and the backward's optimizer settings."""
    from scmc.emit.train import FIELDS

    defaults = {f.name: f.default for f in FIELDS} | dict(train.defaults)
    rows = [
        ("epochs", _short(defaults["epochs"])),
        ("global batch size", _short(defaults["batch_size"])),
        ("image size", _short(defaults["image_size"])),
        ("data", _short(defaults["timm_dataset"] or defaults["data"] or "the embedded digits")),
        ("EMA", f"decay {defaults['ema_decay']}" if defaults["ema"] else "off"),
        ("torch.compile", _short(defaults["compile_mode"]) if defaults["compile"] else "off"),
    ]
    backward = next((c.backward for c in compiled if c.backward is not None), None)
    if backward is not None:
        for opt in backward.optimizers:
            rows.append((f"optimizer `{opt.name}`", f"`{opt.factory.address}`"))
            rows += _bound_rows(f"`{opt.name}` ", opt.factory.kwargs)
            if opt.clip is not None:
                rows.append((f"gradient clipping (`{opt.name}`)", f"`{opt.clip.address}`"))
                rows += _bound_rows(f"`{opt.name}` clip ", opt.clip.kwargs)
        rows.append(("mixed precision", backward.autocast_dtype or "off"))
        rows.append(("gradient accumulation", f"{backward.accumulate} step(s) per update"))
    return rows


def runtime_version() -> str:
    import scmc_runtime

    return scmc_runtime.__version__


def wheel_file(distribution: str, version: str) -> str:
    """The file name setuptools gives a pure-Python wheel of DISTRIBUTION (PEP 427 escaping)."""
    return f"{re.sub(r'[-_.]+', '_', distribution).lower()}-{version}-py3-none-any.whl"


def package_files(pkg: "PackageDef") -> dict[str, bytes]:
    """Every file of the package, by path relative to the package folder: the package definition printed."""
    env = _env()
    name, compiled, model = pkg.name, list(pkg.parts), pkg.model
    layer_files = {stem: path for c in compiled for stem, path in c.files.items()}
    deps = dependencies(
        [c.text for c in compiled if c.text] + [p.read_text(encoding="utf-8") for p in layer_files.values()]
    )
    # the stem lands in a docstring and a TOML string: keep only plain characters of it
    stem = re.sub(r"[^\w .+-]", "_", model.source.path.stem)
    description = f"{stem} compiled by scmc into a standalone PyTorch package."
    src = f"src/{name}"
    files: dict[str, bytes] = {}
    modules = list(pkg.modules)
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
        **common,
        runtime_requirement=RUNTIME_REQUIREMENT,
        imports=imports,
        classes=[cls for _, cls in imports],
        model_class=class_name(model),
    )
    files[f"{src}/__init__.py"] = format_python(init).encode()
    train = train_context(pkg)
    files["pyproject.toml"] = (
        env.get_template("pyproject.toml.j2")
        .render(
            **common,
            distribution=name.replace("_", "-"),
            dependencies=deps,
            runtime_requirement=RUNTIME_REQUIREMENT,
            has_train=train is not None,
            line_length=LINE_LENGTH,
            verbatim_files=sorted(layer_files),
        )
        .encode()
    )
    assert model.program is not None  # the model part is a layer graph
    root = model.program.module(model.program.root)
    shapes = sorted((model.input_shapes or {}).items())
    example = ", ".join(f"torch.randn(2, {', '.join(str(d) for d in spec['shape'])})" for _, spec in shapes) or "..."
    files["README.md"] = (
        env.get_template("README.md.j2")
        .render(
            **common,
            parameters=list(pkg.build.params),
            classes=[(c.role, class_name(c)) for c in modules],
            param_count=model.param_count,
            macs=model.macs,
            input_shapes=shapes,
            inputs=list(root.inputs),
            outputs=list(root.outputs),
            structured=root.structured,
            dependencies=deps,
            extra_deps=[d for d in deps if not d.startswith(("torch", "scmc-runtime"))],
            resolved=sorted((k, json.dumps(v, sort_keys=True, default=repr)) for k, v in model.params.items()),
            model_class=root.name,
            example_call=example,
            rebuild=rebuild_command(pkg),
            hyperparameters=hyperparameters(train, compiled) if train is not None else [],
            has_train=train is not None,
            package_wheel=wheel_file(name, common["version"]),
            runtime_wheel=wheel_file("scmc-runtime", runtime_version()),
            extras="[predict,train]" if train is not None else "",
        )
        .encode()
    )
    if train is not None:
        from scmc.emit.train import render_train

        check_keyword_inputs(compiled)
        files[f"{src}/train.py"] = render_train(train).encode()
        files[f"{src}/predict.py"] = predict_source(pkg, train).encode()
    check_class_names(files, src, [cls for _, cls in imports])
    files[f"{src}/manifest.json"] = (json.dumps(manifest(pkg, deps), indent=2, sort_keys=True) + "\n").encode()
    return files


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(pkg: "PackageDef", dependencies: list[str]) -> dict[str, Any]:
    import torch

    name, compiled = pkg.name, list(pkg.parts)
    inputs = []
    seen: set[str] = set()
    for c in compiled:
        # templates as read (hashing the text read, not the file again, which may have changed since)
        for role, source in [(c.role, c.source), *((f"{c.role} (CFG)", t) for t in c.includes)]:
            if source.display not in seen:
                seen.add(source.display)
                digest = hashlib.sha256(source.text.encode()).hexdigest()
                inputs.append({"role": role, "path": recorded_path(source.path), "sha256": digest})
        for _stem, path in sorted(c.files.items()):
            inputs.append({"role": "layer file", "path": recorded_path(path), "sha256": _sha256(path)})
    model = pkg.model
    return {
        "format": MODEL_FORMAT,
        "package": name,
        "scmc_version": scmc.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "parameters": list(pkg.build.params),
        "resolved_parameters": _jsonable(model.params),
        "rendered_groups": _jsonable(model.groups),
        "inputs": inputs,
        "classes": {c.role: c.program.root for c in compiled if c.program is not None}
        | {c.role: c.backward.classname for c in compiled if c.backward is not None},
        "input_shapes": _jsonable(model.input_shapes or {}),
        "outputs": {c.role: list(c.program.module(c.program.root).outputs) for c in compiled if c.program is not None},
        "backward": _backward_summary(next((c.backward for c in compiled if c.backward is not None), None)),
        "presets": {c.role: _jsonable(c.config) for c in compiled if c.config is not None},
        "parameter_count": model.param_count,
        "dependencies": dependencies,
        "allowed_modules": list(pkg.build.allow_modules),
    }


def _backward_summary(bdef: Any) -> dict[str, Any] | None:
    if bdef is None:
        return None
    return {
        "models": list(bdef.models),
        "losses": list(bdef.losses),
        "optimizers": [o.name for o in bdef.optimizers],
        "accumulate": bdef.accumulate,
        "autocast_dtype": bdef.autocast_dtype,
    }


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=repr, sort_keys=True))


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
        for name, param in zip(root.inputs, emitted, strict=False):
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
            function = functions.get((table.get_name(), table.get_lineno()))
            if table.get_type() != "function" or function is None:
                continue
            local = {sym.get_name() for sym in table.get_symbols() if sym.is_assigned() or sym.is_parameter()}
            for use in ast.walk(function):
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
