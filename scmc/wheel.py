"""`scmc wheel`: a built package's wheel and the matching scmc-runtime wheel, in one folder.

A generated package depends on `scmc-runtime`, which no package index serves. So the package
travels with it: ``scmc wheel artifacts/convnextv2_femto -o dist`` writes

    dist/convnextv2_femto-0.1.0-py3-none-any.whl
    dist/scmc_runtime-0.1.0-py3-none-any.whl

and prints the one command that installs both anywhere (everything else comes from the index):

    pip install dist/scmc_runtime-0.1.0-py3-none-any.whl 'dist/convnextv2_femto-0.1.0-py3-none-any.whl[train,predict]'

The runtime wheel is made from the `scmc_runtime` this scmc imports, the one the package was
compiled against: from its project (``runtime/pyproject.toml``) when it is a source checkout,
else repacked from the installed distribution (its files and its own METADATA, unchanged).
Both wheels are built by pip (``pip wheel --no-deps``) from a copy in a temporary folder, so the
package folder is never written to (pip would leave ``build/`` and ``*.egg-info`` there).

Limits: each pip run may take ``timeout`` seconds (``--timeout``), and the package copied into
a wheel at most ``max_bytes`` (``--max-size-mib``). In the output folder only the two wheel
files are written; an existing file of the same name is replaced only when it is a wheel of
the same distribution and version (an earlier `scmc wheel`), else E1303 and nothing is written.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import scmc
from scmc.diagnostics import Span, fail

DEFAULT_TIMEOUT = 600.0  # seconds per pip run
DEFAULT_MAX_BYTES = 256 * 2**20  # what a package may hold to be copied into a wheel
# what an installer adds to a .dist-info (or a wheel gets written anew): not copied when repacking
INSTALLER_FILES = {"METADATA", "RECORD", "WHEEL", "INSTALLER", "REQUESTED", "direct_url.json"}
SKIPPED = {"__pycache__", "build", "dist", ".eggs"}  # what pip or Python leave in a package folder


@dataclass(frozen=True)
class WheelResult:
    package: Path  # the package's wheel in the output folder
    runtime: Path  # the scmc-runtime wheel next to it
    extras: tuple[str, ...]  # the package's optional-dependency groups

    def install_command(self) -> str:
        """One pip command that installs both wheels (everything else from the index)."""
        import shlex

        extras = f"[{','.join(self.extras)}]" if self.extras else ""
        return f"pip install {shlex.quote(self.runtime.as_posix())} {shlex.quote(self.package.as_posix() + extras)}"


def _display(path: Path) -> str:
    from scmc.load import display_path

    return display_path(path)


def package_name(package_dir: Path) -> str:
    """The import name of the scmc package in PACKAGE_DIR (its one src/<name>/manifest.json)."""
    if not (package_dir / "pyproject.toml").is_file():
        raise fail(
            "E1300",
            f"{_display(package_dir)} is not a package built by scmc (no pyproject.toml)",
            hint="pass the folder `scmc build` wrote, e.g. artifacts/convnextv2_femto",
        )
    manifests = sorted((package_dir / "src").glob("*/manifest.json")) if (package_dir / "src").is_dir() else []
    if len(manifests) != 1:
        what = "no src/<package>/manifest.json" if not manifests else "more than one src/<package>/manifest.json"
        raise fail(
            "E1300",
            f"{_display(package_dir)} is not a package built by scmc ({what})",
            hint="pass the folder `scmc build` wrote, e.g. artifacts/convnextv2_femto",
        )
    return manifests[0].parent.name


def _copy_tree(source: Path, target: Path, max_bytes: int, budget: list[int], top: bool = True) -> None:
    """Copy the regular files of SOURCE (no links, no special files) into TARGET within a size budget."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in sorted(source.iterdir()):
        if entry.name in SKIPPED or entry.name.endswith(".egg-info") or (top and entry.name.startswith(".")):
            continue
        if entry.is_symlink() or not (entry.is_dir() or entry.is_file()):
            raise fail(
                "E1304",
                f"{_display(entry)} is a link or a special file; a wheel holds only the package's own regular files",
                hint="rebuild the package with `scmc build --force`",
            )
        if entry.is_dir():
            _copy_tree(entry, target / entry.name, max_bytes, budget, top=False)
            continue
        budget[0] += entry.stat().st_size
        if budget[0] > max_bytes:
            raise fail(
                "E1304",
                f"{_display(source)} holds more than {max_bytes // 2**20} MiB",
                hint="raise the limit with --max-size-mib if the package really is that large",
            )
        shutil.copyfile(entry, target / entry.name)


def _pip_wheel(project: Path, out: Path, timeout: float, what: str) -> Path:
    """`pip wheel --no-deps PROJECT` into OUT; returns the one wheel it wrote."""
    if importlib.util.find_spec("pip") is None:
        raise fail(
            "E1301", f"building the wheel of {what} needs pip, which this Python lacks", hint="python -m ensurepip"
        )
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--disable-pip-version-check", "-w", str(out)]
    try:  # build with this environment's setuptools when it is recent enough: no download
        if int(importlib.metadata.version("setuptools").split(".")[0]) >= 77:
            command += ["--no-build-isolation", "--no-index"]
    except (importlib.metadata.PackageNotFoundError, ValueError):
        pass
    before = set(out.glob("*.whl"))
    try:
        run = subprocess.run(
            [*command, str(project)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PIP_NO_INPUT": "1"},
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise fail(
            "E1305",
            f"building the wheel of {what} took longer than {timeout:g} s",
            hint="raise the limit with --timeout SECONDS",
        ) from None
    made = sorted(set(out.glob("*.whl")) - before)
    if run.returncode != 0 or len(made) != 1:
        tail = "\n".join((run.stderr or run.stdout).strip().splitlines()[-12:])
        raise fail("E1301", f"pip could not build the wheel of {what}:\n{tail}", hint="see pip's message above")
    return made[0]


def _runtime_project() -> Path | None:
    """The source project of the imported scmc_runtime (runtime/ of a checkout), if it is one."""
    import scmc_runtime

    project = Path(scmc_runtime.__file__).resolve().parents[2]
    try:
        meta = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None
    return project if meta.get("project", {}).get("name") == "scmc-runtime" else None


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _repack_installed_runtime(out: Path) -> Path:
    """The installed scmc-runtime distribution as a wheel: the imported package's files and the
    distribution's own METADATA (so its version and requirements are exactly the installed ones)."""
    import scmc_runtime

    package = Path(scmc_runtime.__file__).resolve().parent
    try:
        dist = importlib.metadata.distribution("scmc-runtime")
    except importlib.metadata.PackageNotFoundError:
        raise fail(
            "E1302",
            f"the scmc_runtime scmc imports ({_display(package)}) is neither a source checkout nor an installed "
            "distribution, so there is no runtime wheel to make",
            hint="install scmc with `pip install ./runtime ./` from the scmc repository",
        ) from None
    version = dist.version
    if version != scmc_runtime.__version__:
        raise fail(
            "E1302",
            f"the installed scmc-runtime distribution is {version} but the imported scmc_runtime is "
            f"{scmc_runtime.__version__} ({_display(package)})",
            hint="reinstall the runtime: `pip install --force-reinstall ./runtime`",
        )
    metadata = dist.read_text("METADATA")
    if not metadata:
        raise fail("E1302", "the installed scmc-runtime distribution has no METADATA", hint="reinstall it")
    info = f"scmc_runtime-{version}.dist-info"
    entries: list[tuple[str, bytes]] = []
    for path in sorted(package.rglob("*")):
        if "__pycache__" in path.parts or path.suffix == ".pyc" or not path.is_file() or path.is_symlink():
            continue
        entries.append((f"scmc_runtime/{path.relative_to(package).as_posix()}", path.read_bytes()))
    entries.append((f"{info}/METADATA", metadata.encode()))
    for file in dist.files or []:  # top_level.txt, entry points, licenses: as installed
        parts = file.parts
        if len(parts) >= 2 and parts[0].endswith(".dist-info") and parts[1] not in INSTALLER_FILES:
            data = Path(file.locate()).read_bytes() if Path(file.locate()).is_file() else None
            if data is not None:
                entries.append((f"{info}/{'/'.join(parts[1:])}", data))
    wheel_text = f"Wheel-Version: 1.0\nGenerator: scmc {scmc.__version__}\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    entries.append((f"{info}/WHEEL", wheel_text.encode()))
    record = "\n".join([*(_record_line(n, d) for n, d in entries), f"{info}/RECORD,,"]) + "\n"
    entries.append((f"{info}/RECORD", record.encode()))
    target = out / f"scmc_runtime-{version}-py3-none-any.whl"
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            info_ = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info_.external_attr = 0o644 << 16
            info_.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info_, data)
    return target


def _check_runtime_range() -> None:
    """The runtime this scmc imports must satisfy the range generated packages require."""
    import scmc_runtime
    from packaging.specifiers import SpecifierSet

    from scmc.emit.package import RUNTIME_REQUIREMENT

    if scmc_runtime.__version__ not in SpecifierSet(RUNTIME_REQUIREMENT):
        raise fail(
            "E1302",
            f"the scmc_runtime scmc imports is {scmc_runtime.__version__}, outside the range generated packages "
            f"require ({RUNTIME_REQUIREMENT})",
            hint="install the scmc-runtime of this scmc's repository: `pip install ./runtime`",
        )


def _wheel_identity(path: Path) -> str | None:
    """`<name>-<version>` of the wheel at PATH (from its .dist-info/WHEEL entry), or None if PATH is no wheel."""
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                top, _, rest = name.partition("/")
                if rest == "WHEEL" and top.endswith(".dist-info"):
                    return top[: -len(".dist-info")].lower()
    except (OSError, zipfile.BadZipFile):
        return None
    return None


def _place(made: list[Path], output: Path) -> list[Path]:
    """Move the built wheels into OUTPUT, replacing only earlier builds of the same wheels."""
    targets = [output / w.name for w in made]
    for wheel, target in zip(made, targets, strict=True):
        if target.is_symlink() or (target.exists() and not target.is_file()):
            raise fail("E1303", f"{_display(target)} exists and is not a file", hint="choose another -o folder")
        if target.exists() and _wheel_identity(target) != _wheel_identity(wheel):
            raise fail(
                "E1303",
                f"{_display(target)} exists and is not a wheel of the same distribution and version",
                hint="scmc replaces only a wheel it could have written; move the file away or choose another -o folder",
            )
    try:
        output.mkdir(parents=True, exist_ok=True)
        for wheel, target in zip(made, targets, strict=True):
            staged = output / f".{target.name}.tmp-{os.getpid()}"
            shutil.copyfile(wheel, staged)
            os.replace(staged, target)
    except OSError as exc:
        raise fail(
            "E1303", f"cannot write to {_display(output)}: {exc.strerror or exc}", hint="choose another -o folder"
        ) from None
    return targets


def build_wheels(
    package_dir: Path, output: Path, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES
) -> WheelResult:
    name = package_name(package_dir)
    try:
        meta = tomllib.loads((package_dir / "pyproject.toml").read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise fail(
            "E1300", f"pyproject.toml is not valid TOML: {exc}", Span(_display(package_dir / "pyproject.toml"))
        ) from exc
    extras = tuple(sorted(meta.get("project", {}).get("optional-dependencies", {})))
    inside = output.resolve()
    if inside == package_dir.resolve() or package_dir.resolve() in inside.parents:
        raise fail(
            "E1303",
            f"{_display(output)} is inside the package folder {_display(package_dir)}; scmc never writes into its input",
            hint="write the wheels next to the package, e.g. -o ../dist from inside it",
        )
    _check_runtime_range()
    with tempfile.TemporaryDirectory(prefix="scmc-wheel-") as tmp:
        work, out = Path(tmp) / "package", Path(tmp) / "wheels"
        out.mkdir()
        _copy_tree(package_dir, work, max_bytes, [0])
        made = [_pip_wheel(work, out, timeout, f"package `{name}`")]
        project = _runtime_project()
        if project is not None:
            runtime = Path(tmp) / "runtime"
            (runtime / "src").mkdir(parents=True)
            shutil.copyfile(project / "pyproject.toml", runtime / "pyproject.toml")
            _copy_tree(project / "src" / "scmc_runtime", runtime / "src" / "scmc_runtime", max_bytes, [0])
            made.append(_pip_wheel(runtime, out, timeout, "scmc-runtime"))
        else:
            made.append(_repack_installed_runtime(out))
        placed = _place(made, output)
    return WheelResult(package=placed[0], runtime=placed[1], extras=extras)
