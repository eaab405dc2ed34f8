"""MkDocs hooks (``hooks:`` in mkdocs.yml): the pages generated at build time, so they never go
stale: the CLI reference walks the Typer app, the API reference lists ``perturb_lens.__all__``.

The site's other pages are markdown in ``docs/``; the repository-root files (BENCHMARKS.md,
REPLICATION.md) are included by ``pymdownx.snippets`` from their own files.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

CLI_PAGE = "reference/cli.md"
API_PAGE = "reference/api.md"
PROGRAM = "perturb-lens"


# ---- the CLI reference ----------------------------------------------------------------------


def click_command(app: Any) -> Any:
    """The click command behind a Typer app (or a click command itself)."""
    import typer

    return typer.main.get_command(app) if isinstance(app, typer.Typer) else app


def walk_commands(
    command: Any, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every visible command below ``command`` as (path of names, command), depth first, in the
    app's order; groups come before their subcommands."""
    for name, sub in getattr(command, "commands", {}).items():
        if getattr(sub, "hidden", False):
            continue
        yield (*path, name), sub
        yield from walk_commands(sub, (*path, name))


def _help_markdown(text: str | None) -> str:
    """Click help text as markdown: paragraphs joined, ``\\b`` paragraphs kept verbatim."""
    out = []
    for para in (text or "").strip().split("\n\n"):
        if para.startswith("\b"):
            out.append("```text\n" + para.lstrip("\b\n").rstrip() + "\n```")
        elif para.strip():
            out.append(_escape(" ".join(line.strip() for line in para.splitlines())))
    return "\n\n".join(out)


def _escape(text: str) -> str:
    """Text for a markdown paragraph or table cell: no HTML, no table breaks, no emphasis."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("*", "\\*").replace("_", "\\_")


def _type_name(param: Any) -> str:
    """The parameter's type as a reader writes it (``str``, ``list[str]``, ``int``, choices)."""
    desc = getattr(param, "type_descriptor", None)  # typer >= 0.25 (its own click)
    if desc is not None:
        ann = desc.annotation
        if getattr(ann, "__origin__", None) is not None:
            return str(ann).replace("typing.", "")
        return getattr(ann, "__name__", str(ann))
    ptype = getattr(param, "type", None)
    choices = getattr(ptype, "choices", None)
    return " \\| ".join(map(str, choices)) if choices else str(getattr(ptype, "name", ""))


def _is_flag(param: Any) -> bool:
    return bool(getattr(param, "is_flag", False)) or _type_name(param) == "bool"


def _usage(path: tuple[str, ...], command: Any) -> str:
    """``perturb-lens run [OPTIONS] CONFIG [OVERRIDES]...`` from the command's parameters."""
    words = [PROGRAM, *path]
    if any(_is_option(p) for p in command.params):
        words.append("[OPTIONS]")
    for p in command.params:
        if _is_option(p):
            continue
        name = (p.name or "").upper()
        many = "..." if getattr(p, "nargs", 1) == -1 else ""
        words.append(f"{name}{many}" if p.required else f"[{name}]{many}")
    if getattr(command, "commands", None):
        words.append("COMMAND [ARGS]...")
    return " ".join(words)


def _is_option(param: Any) -> bool:
    return getattr(param, "param_type_name", "") == "option" or any(
        o.startswith("-") for o in param.opts
    )


def _default(param: Any) -> str:
    value = getattr(param, "default", None)
    if param.required or value is None or (_is_flag(param) and value is False):
        return ""
    if _is_flag(param) and param.secondary_opts:  # --native/--generic: the one in effect
        return f"`{param.opts[0] if value else param.secondary_opts[0]}`"
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value)) if value else ""
    return f"`{value}`" if str(value) else ""


def _param_rows(command: Any) -> list[str]:
    """One markdown table row per visible parameter: name(s), type, default, help."""
    rows = []
    for p in command.params:
        if getattr(p, "hidden", False):
            continue
        if _is_option(p):
            names = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
        else:
            names = f"`{(p.name or '').upper()}`" + (" (required)" if p.required else "")
        kind = "flag" if _is_flag(p) else _type_name(p)
        help_text = " ".join((getattr(p, "help", None) or "").split())
        rows.append(f"| {names} | {kind} | {_default(p)} | {_escape(help_text)} |")
    return rows


def cli_reference(app: Any) -> str:
    """The CLI reference page: every command of ``app`` with its usage, help and parameters."""
    root = click_command(app)
    lines = [
        "# Command line reference",
        "",
        f"Generated from the Typer app `perturb_lens.cli:app` when the site is built; `{PROGRAM} "
        "COMMAND --help` prints the same. Every command stops with a message that says what to do "
        "(no traceback) on a bad input.",
        "",
        _help_markdown(root.help),
        "",
        f"**Usage:** `{_usage((), root)}`",
        "",
    ]
    if root.params:
        lines += ["| parameter | type | default | what it does |", "|---|---|---|---|"]
        lines += [*_param_rows(root), ""]
    for path, command in walk_commands(root):
        level = "#" * (1 + len(path))
        lines += [f"{level} {PROGRAM} {' '.join(path)}", "", _help_markdown(command.help), ""]
        lines += [f"**Usage:** `{_usage(path, command)}`", ""]
        rows = _param_rows(command)
        if rows:
            lines += ["| parameter | type | default | what it does |", "|---|---|---|---|"]
            lines += [*rows, ""]
    return "\n".join(lines).rstrip() + "\n"


# ---- the API reference ----------------------------------------------------------------------


def api_entries() -> list[tuple[str, str | None]]:
    """``(public name, dotted path of its definition)`` for each name of ``perturb_lens.__all__``
    (importing each; None for a plain value such as ``__version__``)."""
    import perturb_lens

    entries = []
    for name in perturb_lens.__all__:
        obj = getattr(perturb_lens, name)
        module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        entries.append((name, f"{module}.{qualname}" if module and qualname else None))
    return entries


def api_reference() -> str:
    """The API reference page: one mkdocstrings block per public name."""
    import perturb_lens

    lines = [
        "# Python API reference",
        "",
        "Generated when the site is built from `perturb_lens.__all__`: every public name, with "
        "its docstring and signature. `import perturb_lens as pl` imports each name on first use. "
        "The registries that extend the package are on [Extending](../extending.md).",
        "",
    ]
    for name, path in api_entries():
        lines += [f"## `pl.{name}`", ""]
        if path is None:
            value = getattr(perturb_lens, name)
            lines += [f"`{value!r}` (a {type(value).__name__}).", ""]
        else:
            lines += [f"::: {path}", "    options:", "      show_root_heading: false",
                      "      show_root_toc_entry: false", "      heading_level: 3", ""]
    return "\n".join(lines)


# ---- MkDocs events --------------------------------------------------------------------------


def on_config(config: Any) -> Any:
    """Build from this checkout from any working directory: its ``src`` first on ``sys.path``
    (for the generated pages) and the snippets' base path at the repository root."""
    src = str(REPO / "src")
    if (REPO / "src" / "perturb_lens").is_dir() and src not in sys.path:
        sys.path.insert(0, src)
    config["mdx_configs"].setdefault("pymdownx.snippets", {})["base_path"] = [str(REPO)]
    return config


def on_files(files: Any, config: Any) -> Any:
    """Add the generated pages to the site's files."""
    from mkdocs.structure.files import File

    app = importlib.import_module("perturb_lens.cli").app
    for uri, content in ((CLI_PAGE, cli_reference(app)), (API_PAGE, api_reference())):
        files.append(File.generated(config, uri, content=content))
    return files

