"""Loading user files: CFG templates (only inside the allowed folders) and trusted `_file_` layer modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scmc.diagnostics import Span
from scmc.load import Source, read_template
from scmc.lower.common import LowererBase, error_at
from scmc.names import is_name


def display_dir(path: Path) -> str:
    from scmc.load import display_path

    return display_path(path)


def folder_words(root: Path) -> str:
    """`the template's folder cfg/models`, for the messages that refuse a path outside it."""
    shown = display_dir(root)
    return "the template's folder " + ("(the working directory)" if shown == "." else shown)


def cfg_roots(source: Source, allowed: tuple[Path, ...] = ()) -> tuple[Path, ...]:
    """The folders a build part may read templates from (CFG, PACKAGE): the folder of its template
    and the --allow-cfg-dir folders, symbolic links resolved."""
    return (source.directory.resolve(), *(Path(d).resolve() for d in allowed))


class TemplateFiles(LowererBase):
    """The files a template reads: CFG templates (inside the allowed folders) and `_file_` modules.

    A part of :class:`~scmc.lower.lowerer.Lowerer`.
    """

    def _resolve_cfg(self, cfg: str, source: Source, span: Span) -> Path:
        """The file a CFG names: next to the including template, else from the working directory,
        where that (after following symbolic links) lies inside the root template's folder or an
        --allow-cfg-dir folder. A candidate outside them is refused before anything reads it, so
        that a template cannot make the build read, and a diagnostic show, some other file."""
        from scmc import cache

        roots = self.cfg_roots or cfg_roots(source, self.options.cfg_dirs)
        inside = []  # the candidates inside the allowed folders (only those are looked at)
        for path in (source.directory / cfg, Path(cfg)):
            try:
                resolved = path.resolve()
                if not any(resolved.is_relative_to(root) for root in roots):
                    continue  # not even probed: whether it exists is none of the template's business
                inside.append(path)
                kind = "file" if resolved.is_file() else "other" if resolved.exists() else None
            except (OSError, ValueError) as exc:  # a NUL character, a name too long for the system
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise error_at(
                    "E0792", f"CFG is not a usable file path ({why})", span, "CFG names a template file"
                ) from None
            if kind == "file":
                return resolved
            if kind == "other":
                raise error_at(
                    "E0791",
                    f"CFG `{cfg}` is not a regular file",
                    span,
                    "CFG names a template file (a .yaml file next to this template)",
                )
            cache.note_absent(path)  # a file created here later changes which one is read
        if not inside:
            raise error_at(
                "E0790",
                f"CFG `{cfg}` is outside {folder_words(roots[0])}; it was not read",
                span,
                "CFG reads templates from the folder of the template given on the command line and its "
                "subfolders; move the file there, or pass --allow-cfg-dir DIR to allow another folder",
            )
        where = f"looked next to {source.display} and in the working directory"
        if inside == [source.directory / cfg] and source.directory.resolve() != Path.cwd().resolve():
            where = (
                f"looked next to {source.display}, not in the working directory (outside "
                f"{folder_words(roots[0])}; --allow-cfg-dir . lets CFG look there)"
            )
        raise error_at("E0706", f"CFG file `{cfg}` not found", span, where)

    def _read(self, path: Path) -> Source:
        key = path.resolve()
        if key not in self.templates:
            self.templates[key] = read_template(path)
        return self.templates[key]

    def _file_module(self, file: Any, span: Span, folder: Path | None) -> str:
        """`_file_: blocks.py` next to the template: trusted only with --allow-module blocks.

        The file is loaded (which runs it) as ``scmc_files.blocks`` and later copied into the
        package as ``<package>/blocks.py``; generated code imports it relatively.
        """
        import importlib.util
        import sys
        import types

        directory = (folder if folder is not None else Path.cwd()).resolve()  # the naming template's folder
        if not isinstance(file, str) or not file.endswith(".py"):
            raise error_at("E0748", f"`_file_` must name a .py file next to the template, not `{file}`", span)
        path = (directory / file).resolve()
        try:
            path.relative_to(directory)
        except ValueError:
            raise error_at(
                "E0755",
                f"`_file_: {file}` points outside the template's directory",
                span,
                "layer files must sit in the template's directory (no `..`, absolute paths or symlinks out)",
            ) from None
        if not path.is_file():
            raise error_at("E0756", f"`_file_: {file}` does not exist", span, f"looked in {display_dir(directory)}")
        stem = path.stem
        reserved = {"model", "loss", "metric", "backward", "train", "predict", "manifest", "scmc_files"}
        if not is_name(stem) or stem in reserved or stem in self.options.allow.roots:
            raise error_at(
                "E0757",
                f"`{path.name}` cannot become a module of the package",
                span,
                f"rename it; {', '.join(sorted(reserved))} and allow-listed roots are taken",
            )
        if stem not in self.options.allow.extra:
            raise error_at(
                "E0748",
                f"`_file_: {file}` runs the Python code in {path.name} at build time",
                span,
                f"if you trust it, pass --allow-module {stem}",
            )
        known = self.files.get(stem)
        if known is not None and known != path:
            raise error_at("E0758", f"two layer files are named {path.name}", span, "rename one of them")
        module_name = f"scmc_files.{stem}"
        if known is None:
            package = sys.modules.setdefault("scmc_files", types.ModuleType("scmc_files"))
            package.__path__ = []  # type: ignore[attr-defined]
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)  # type: ignore[union-attr]
            except Exception as exc:
                del sys.modules[module_name]
                raise error_at("E0759", f"loading {path.name} failed: {type(exc).__name__}: {exc}", span) from None
            setattr(package, stem, module)
            self.files[stem] = path
            if module_name not in self.options.allow.extra:
                self.options.allow.extra = (*self.options.allow.extra, module_name)
        return module_name
