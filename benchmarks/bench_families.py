"""Other model families: generated ResNet-50 and ViT-Tiny against torchvision's and timm's models.

(a) Forward latency, same process, ``torch.set_num_threads(2)``, eval, ``inference_mode``,
    224x224, batch 1 and 8: the generated ResNet-50 against ``torchvision.models.resnet50`` and
    the generated ViT-Tiny against timm's ``vit_tiny_patch16_224``, each carrying the reference's
    weights (outputs checked equal first), interleaved rounds, median of paired ratios (goal
    <= 1.02 each).
(b) Build time of resnet50 and ViT-Base (model + the template's default package), whole
    process, interleaved with ``python -c "import torch, timm"``, the floor every build pays.

    .venv/bin/python benchmarks/bench_families.py [--quick] [--json PATH]
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List

from _common import (
    PYTHON,
    SCMC,
    Result,
    goal,
    interleaved,
    judge,
    main_for,
    measure_process,
    median,
    median_ci,
    progress,
    run_process,
    spread,
)
from bench_forward import load_model_class, time_config

GOAL_RATIO = 1.02
TOLERANCE = 1e-4
THREADS = 2
BATCHES = [1, 8]
ROUNDS = 60  # 30 left the median's CI of ResNet-50 b8 straddling the goal on a quiet machine
BUDGET_SECONDS = 120.0  # per configuration; past it, stop after bench_forward.MIN_ROUNDS
FAMILIES = {  # label: (template, group, reference)
    "ResNet-50": ("cfg/models/ResNet.yaml", "resnet50", "torchvision resnet50"),
    "ViT-Tiny": ("cfg/models/ViT.yaml", "tiny", "timm vit_tiny_patch16_224"),
}
BUILDS = {"resnet50": ("cfg/models/ResNet.yaml", "resnet50"), "vit_base": ("cfg/models/ViT.yaml", "base")}
FLOOR = "import torch, timm"


def scmc_argv() -> List[str]:
    return [SCMC] if SCMC else [PYTHON, "-m", "scmc"]


def build_model(template: str, group: str, out: Path) -> Any:
    run_process(scmc_argv() + ["build", template, "-p", f"backbone={group}", "-o", str(out), "-q"])
    return load_model_class(next(out.glob("src/*/model.py")))()


def reference_model(label: str) -> Any:
    if label == "ResNet-50":
        import torchvision

        return torchvision.models.resnet50(weights=None)
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False)


def copy_reference_weights(label: str, reference: Any, generated: Any) -> None:
    """The same tensors in the same order, except that timm's ViT keeps cls_token and pos_embed
    before patch_embed."""
    theirs = reference.state_dict()
    order = list(theirs)
    if label == "ViT-Tiny":
        order = [k for k in theirs if k.startswith("patch_embed.")] + ["cls_token", "pos_embed"]
        order += [k for k in theirs if k not in order]
    mine = generated.state_dict()
    if len(mine) != len(order):
        raise AssertionError(f"{label}: {len(mine)} tensors vs {len(order)}")
    generated.load_state_dict({key: theirs[ref].clone() for key, ref in zip(mine, order)}, strict=True)


def run(quick: bool) -> Result:
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    rounds = 6 if quick else ROUNDS
    tmp = Path(tempfile.mkdtemp(prefix="scmc-bench-families-"))
    forward: Dict[str, Any] = {}
    try:
        for label, (template, group, ref_name) in FAMILIES.items():
            progress(f"bench_families: building {label}")
            generated = build_model(template, group, tmp / group).eval()
            reference = reference_model(label).eval()
            copy_reference_weights(label, reference, generated)
            fns: Dict[str, Callable[[Any], Any]] = {"scmc": lambda x, m=generated: m(x)["cls"], ref_name: reference}
            with torch.inference_mode():
                x = torch.randn(2, 3, 224, 224)
                diff = (fns["scmc"](x) - reference(x)).abs().max().item()
            if not diff < TOLERANCE:
                raise AssertionError(f"{label}: generated differs from {ref_name} by {diff:.3g}")
            configs = {}
            for batch in BATCHES:
                configs[batch] = time_config(
                    fns, batch, rounds, f"{label} b{batch}", reference=ref_name, budget=BUDGET_SECONDS
                )
            forward[label] = {"reference": ref_name, "diff": diff, "configs": configs}
        builds = time_builds(tmp, 3 if quick else 7)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report(forward, builds)


def time_builds(tmp: Path, rounds: int) -> Dict[str, List[Any]]:
    counter = iter(range(10**6))
    subjects: Dict[str, Callable[[], Any]] = {
        FLOOR: lambda: measure_process([PYTHON, "-c", "import os, torch, timm; os._exit(0)"]),
    }
    for name, (template, group) in BUILDS.items():
        subjects[f"scmc build {name}"] = lambda t=template, g=group, n=name: measure_process(
            scmc_argv() + ["build", t, "-p", f"backbone={g}", "-o", str(tmp / f"build-{n}-{next(counter)}"), "-q"]
        )
    progress(f"bench_families: {rounds} rounds of builds")
    return interleaved(subjects, rounds)


def report(forward: Dict[str, Any], builds: Dict[str, List[Any]]) -> Result:
    rows, goals = [], []
    for label, data in forward.items():
        ref_name = data["reference"]
        for batch, config in data["configs"].items():
            s = config["samples"]
            gen, ref = s["scmc"], s[ref_name]
            ratios = [g / r for g, r in zip(gen, ref)]
            lo, hi = median_ci(ratios)
            for name in ("scmc", ref_name):
                rows.append(
                    [
                        label,
                        batch,
                        len(s[name]),
                        name,
                        f"{median(s[name]) * 1000:.2f}",
                        spread([v * 1000 for v in s[name]]),
                    ]
                )
            goals.append(
                goal(
                    f"{label}, batch {batch}, {THREADS} threads: generated / {ref_name} <= {GOAL_RATIO}",
                    f"{median(ratios):.3f} (CI {lo:.3f}-{hi:.3f}; ratio of mins {min(gen) / min(ref):.3f})",
                    judge(ratios, GOAL_RATIO),
                )
            )
    floor = [wall for wall, _ in builds[FLOOR]]
    build_rows = []
    for name, samples in builds.items():
        walls, cpus = [w for w, _ in samples], [c for _, c in samples]
        build_rows.append(
            [
                name,
                len(walls),
                f"{median(walls):.2f}",
                spread(walls),
                f"{median(cpus):.2f}",
                f"{median(w / f for w, f in zip(walls, floor)):.2f}",
            ]
        )
    return {
        "name": "families",
        "title": "Other model families: ResNet-50 and ViT-Tiny",
        "description": (
            f"Forward: `torch.set_num_threads({THREADS})`, eval, `inference_mode`, 224x224, interleaved rounds, the "
            "reference's weights copied in (max abs diff: "
            + ", ".join(f"{k} {v['diff']:.1e}" for k, v in forward.items())
            + "). Builds: whole processes (model + the template's default loss, metric, backward and presets), "
            f"interleaved with `{FLOOR}`."
        ),
        "sections": [
            {
                "title": "Forward latency",
                "columns": ["model", "batch", "rounds", "implementation", "median ms", "min-max ms"],
                "rows": rows,
                "note": "Goals use the median over rounds of generated/reference within the same round.",
            },
            {
                "title": "Build time",
                "columns": ["command", "runs", "median s", "min-max s", "median CPU s", f"x `{FLOOR}`"],
                "rows": build_rows,
                "note": "Report only: the import floor is paid by every build before it compiles anything.",
            },
        ],
        "goals": goals,
        "raw": {"forward": forward, "builds": builds},
    }


if __name__ == "__main__":
    main_for("bench_families", run, __doc__.splitlines()[0])
