"""The code blocks of the project's markdown, found and run as a reader would: README sections
(tests/test_readme.py, tests/test_notebook.py) and the documentation site's pages
(tests/test_docs.py), with the files the pages include expanded as the site build expands them.

Python blocks run in order in one namespace per page; ``perturb-lens`` command lines of shell
blocks are parsed by the CLI's own parser (commands and options exist, required arguments are
given) without running them; YAML blocks that are run configs are validated as configs.
"""

from __future__ import annotations

import contextlib
import re
import shlex
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    flags=re.MULTILINE | re.DOTALL,
)
SHELL = ("bash", "sh", "shell", "console")
PROGRAM = "perturb-lens"

# Registries a snippet may add to: (module, attribute holding the registry dict).
REGISTRY_KINDS = (
    "metric",
    "direction",
    "scale",
    "experiment",
    "model family",
    "figure set",
    "claim",
    "replication claim",
)
"""Every registry of the package (``perturb_lens.common.registry``), by kind."""


def fenced_blocks(text: str, lang: str | Iterable[str] = "python") -> list[str]:
    """The bodies of the fenced blocks in ``lang`` (one name or several), in order, dedented."""
    langs = {lang} if isinstance(lang, str) else set(lang)
    out = []
    for m in FENCE.finditer(text):
        if m["lang"] in langs:
            indent = m["indent"]
            out.append("".join(line.removeprefix(indent) for line in m["body"].splitlines(True)))
    return out


def section(text: str, heading: str) -> str:
    """The text under the level-2 heading ``## heading``, up to the next level-2 heading."""
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def run_blocks(blocks: Iterable[str], filename: str | Path, namespace: dict | None = None) -> dict:
    """Execute python blocks in order in one namespace (tracebacks name ``filename``)."""
    namespace = {"__name__": "docs"} if namespace is None else namespace
    for code in blocks:
        exec(compile(code, str(filename), "exec"), namespace)
    return namespace


@contextlib.contextmanager
def registries_restored() -> Iterator[None]:
    """Whatever snippets register inside is unregistered on exit (the built-ins stay: a
    snapshot loads them first)."""
    from perturb_lens.common.registry import registry

    saved = {kind: registry(kind).snapshot() for kind in REGISTRY_KINDS}
    try:
        yield
    finally:
        for kind, entries in saved.items():
            registry(kind).restore(entries)


# ---- the site's pages ------------------------------------------------------------------------


def site_config() -> dict[str, Any]:
    """mkdocs.yml (its ``!!python`` tags, if any, left unresolved)."""

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    return yaml.load((REPO / "mkdocs.yml").read_text(), Loader=_Loader)


def nav_pages(nav: Any | None = None) -> list[str]:
    """The markdown files the site's nav names, in order (relative to docs/)."""
    nav = site_config()["nav"] if nav is None else nav
    out: list[str] = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        out += nav_pages(value) if isinstance(value, list) else [value]
    return out


def page_source(page: str) -> str:
    """A page's markdown with its ``--8<--`` includes expanded by pymdownx.snippets, configured
    as the site build configures it (base path: the repository root)."""
    import markdown

    md = markdown.Markdown(
        extensions=["pymdownx.snippets"],
        extension_configs={"pymdownx.snippets": {"base_path": [str(REPO)], "check_paths": True}},
    )
    lines = (DOCS / page).read_text().split("\n")
    return "\n".join(md.preprocessors["snippet"].run(lines))


# ---- command lines and configs ----------------------------------------------------------------


def cli_commands(text: str) -> list[list[str]]:
    """The arguments of every ``perturb-lens`` command in the shell blocks of ``text``
    (``.venv/bin/perturb-lens`` too; commands joined by ``&&``, ``;`` or ``|`` taken apart)."""
    out = []
    for block in fenced_blocks(text, SHELL):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line.removeprefix("$ "), posix=True, punctuation_chars=True)
            lexer.whitespace_split = True  # words as a shell splits them; ; && | apart
            words = list(lexer)
            command: list[str] | None = None
            for word in [*words, "&&"]:
                if word in ("&&", ";", "|", "||"):
                    if command is not None:
                        out.append(command)
                    command = None
                elif command is not None:
                    command.append(word)
                elif word.rsplit("/", 1)[-1] == PROGRAM:
                    command = []
    return out


def check_cli(args: list[str]) -> None:
    """Parse ``perturb-lens ARGS`` with the app's own parser, running nothing: raises
    AssertionError with the parser's message on an unknown command or option or a missing
    argument. ``--help`` anywhere is accepted."""
    import typer

    from perturb_lens.cli.app import app

    command: Any = typer.main.get_command(app)
    path = [PROGRAM]
    rest = list(args)
    while getattr(command, "commands", None):  # a group: its options, then a subcommand
        flags = [w for w in rest if w.startswith("-")]
        names = [w for w in rest if not w.startswith("-")]
        if "--help" in flags and not names:
            return
        if not names or names[0] not in command.commands:
            raise AssertionError(
                f"`{' '.join([*path, *args])}`: {' '.join(path)} has no command "
                f"{names[0] if names else '(none given)'!r}; it has {sorted(command.commands)}"
            )
        at = rest.index(names[0])
        command.make_context(path[-1], rest[: at + 1])  # the group's own options
        path.append(names[0])
        command, rest = command.commands[names[0]], rest[at + 1 :]
    if "--help" in rest:
        return
    try:
        command.make_context(path[-1], rest)
    except Exception as err:
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        raise AssertionError(f"`{' '.join([PROGRAM, *args])}`: {message}") from None


def run_configs(text: str) -> list[dict[str, Any]]:
    """The run configs in the YAML blocks of ``text``: whole configs and fragments, and the
    ``base`` of SAE suites (``perturb-lens sae run``); SAE training files are left out."""
    out = []
    for block in fenced_blocks(text, "yaml"):
        data = yaml.safe_load(block)
        if isinstance(data, dict) and "saes" in data:
            data = data.get("base")  # a suite: its runs are the base with each SAE
        if isinstance(data, dict) and "preset" in data:  # a file on top of a shipped preset
            from perturb_lens.config.preset import merge, preset_path

            base = yaml.safe_load(preset_path(data.pop("preset")).read_text())
            base.pop("description", None)
            data = merge(base, data)
        if isinstance(data, dict):
            data.pop("description", None)  # a preset's own line, dropped by the loader too
            out.append(data)
    return out
