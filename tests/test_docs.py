"""The documentation site (mkdocs.yml, docs/): it builds with ``mkdocs build --strict``, opens from
disk with no network (search included), its generated references cover the CLI and the public
API, and its code runs: python blocks execute, ``perturb-lens`` command lines parse with the
app's own parser, YAML configs validate. Mechanism: tests/doc_blocks.py (shared with the
README's tests)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from doc_blocks import (
    DOCS,
    REPO,
    check_cli,
    cli_commands,
    fenced_blocks,
    nav_pages,
    page_source,
    registries_restored,
    run_blocks,
    run_configs,
)
from test_report_browser import browser  # noqa: F401  (the headless Chromium fixture)

import perturb_lens
from perturb_lens.cli import app

MISSING = [
    m for m in ("mkdocs", "material", "pymdownx", "mkdocstrings_handlers")
    if importlib.util.find_spec(m) is None
]  # fmt: skip
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"{', '.join(MISSING)} not installed: pip install -e '.[docs]'"
)
GENERATED = ("reference/cli.md", "reference/api.md")  # made by docs/hooks.py at build time
PAGES = [p for p in nav_pages() if p not in GENERATED]
# Pages whose code runs an experiment on the embedded model (~1 min on 2 busy cores).
SLOW_PAGES = {"getting-started.md"}


def _hooks():
    """docs/hooks.py, the build's hook module, imported from its file."""
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- the pages and the nav ----------------------------------------------------------------------


def test_nav_and_pages_agree() -> None:
    """Every page in docs/ is in the nav, and every nav entry is a page or a generated one."""
    on_disk = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    nav = set(nav_pages())
    assert on_disk - nav == set(), "pages missing from the nav of mkdocs.yml"
    assert nav - on_disk == set(GENERATED)


# ---- the code on the site -----------------------------------------------------------------------


def _page_params() -> list:
    if MISSING:  # the pages' includes need pymdownx: every test here skips
        return []
    out = []
    for page in PAGES:
        if not fenced_blocks(page_source(page)):
            continue
        marks = [pytest.mark.slow] if page in SLOW_PAGES else []
        out.append(pytest.param(page, marks=marks, id=page))
    return out


@pytest.mark.parametrize("page", _page_params())
def test_page_code_runs(page: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch):
    """A page's python blocks run in order in one namespace (as a reader pastes them), in an
    empty working directory; what they register is unregistered afterwards. Pages that load the
    embedded model skip without it."""
    blocks = fenced_blocks(page_source(page))
    if any("smollm2-135m" in b for b in blocks):
        request.getfixturevalue("smollm2")  # skips without the model; converts it once
    monkeypatch.chdir(tmp_path)
    with registries_restored():
        run_blocks(blocks, DOCS / page)


def test_every_page_with_code_is_tested() -> None:
    """The parametrisation above covers every page that has python blocks (none is dropped by a
    typo in the nav), and the included README sections bring their blocks along."""
    tested = {p.values[0] for p in _page_params()}
    assert "extending.md" in tested and "concepts/directions.md" in tested
    extending = fenced_blocks(page_source("extending.md"))
    assert any("register_metric(" in b for b in extending)  # from README.md:extending-metric
    assert any("register_family(" in b for b in extending)


def _site_text() -> str:
    """Every page's markdown (includes expanded) and the README."""
    return "\n".join([*(page_source(p) for p in PAGES), (REPO / "README.md").read_text()])


def test_command_lines_parse() -> None:
    """Every ``perturb-lens`` command in the shell blocks of the site and the README names an
    existing command with existing options and its required arguments."""
    commands = cli_commands(_site_text())
    assert len(commands) >= 20
    assert {c[0] for c in commands} >= {"run", "report", "verdicts", "sae", "compare"}
    for args in commands:
        check_cli(args)


@pytest.mark.parametrize(
    "args, message",
    [
        (["runn", "x.yaml"], "has no command 'runn'"),
        (["run", "x.yaml", "--outt", "d"], "No such option"),
        (["report"], "Missing"),
        (["sae", "trian", "c.yaml"], "has no command 'trian'"),
    ],
)
def test_command_check_refuses_stale_commands(args: list[str], message: str) -> None:
    """The check above can fail: a renamed command or option, a missing argument."""
    with pytest.raises(AssertionError, match=message):
        check_cli(args)


def test_command_lines_found_in_shell_blocks() -> None:
    """Continuation lines, ``&&`` chains, comments and the venv's path are taken apart."""
    text = (
        "```bash\nbash scripts/install.sh && .venv/bin/perturb-lens run c.yaml  # main job\n"
        "perturb-lens report RUN \\\n  --log-y; echo done\n```\n"
        "```python\nperturb-lens = 1\n```\n"
    )
    assert cli_commands(text) == [["run", "c.yaml"], ["report", "RUN", "--log-y"]]


def test_configs_on_the_site_validate() -> None:
    """YAML blocks that are run configs (the presets the experiment pages include, fragments on
    the concept pages, SAE suites' ``base``) validate as configs."""
    from perturb_lens.config import validate_config

    configs = run_configs(_site_text())
    assert len(configs) >= 15
    for data in configs:
        validate_config(data)


# ---- the generated references -------------------------------------------------------------------


def _help_commands(args: list[str]) -> list[str]:
    """Command names listed by ``perturb-lens ARGS --help`` (the user's view of the app)."""
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    start = next((i for i, line in enumerate(lines) if re.search(r"\bCommands\b", line)), None)
    if start is None:
        return []
    names = []
    for line in lines[start + 1 :]:
        if not line.strip() or line.startswith("╰"):
            break
        m = re.match(r"^(?:│ |  )(\S+)\s{2,}", line)
        if m:
            names.append(m[1])
    return names


def test_cli_reference_lists_every_command() -> None:
    """Each command of the app, walked through its ``--help`` screens, has a section (heading
    ``perturb-lens sae train``) with its usage line, and each of its options appears there."""
    page = _hooks().cli_reference(app)
    expected: list[list[str]] = []
    todo: list[list[str]] = [[]]
    while todo:
        path = todo.pop(0)
        for name in _help_commands(path):
            expected.append([*path, name])
            todo.append([*path, name])
    assert len(expected) >= 12 and ["sae", "l0-sweep"] in expected
    sections = re.split(r"^#+ ", page, flags=re.MULTILINE)
    by_title = {s.splitlines()[0]: s for s in sections if s.strip()}
    for path in expected:
        title = " ".join(["perturb-lens", *path])
        assert title in by_title, f"no section for `{title}`"
        assert f"**Usage:** `{title}" in by_title[title]
    import typer

    command = typer.main.get_command(app)
    for path in expected:
        sub = command
        for name in path:
            sub = sub.commands[name]
        for param in sub.params:
            for opt in param.opts:
                shown = f"`{opt}`" if opt.startswith("-") else f"`{opt.upper()}`"
                assert shown in by_title[" ".join(["perturb-lens", *path])], (path, opt)


def test_api_reference_covers_all_public_names() -> None:
    """One section per name of ``perturb_lens.__all__``; each documented path is the object the
    package exports under that name."""
    hooks = _hooks()
    page = hooks.api_reference()
    for name, path in hooks.api_entries():
        assert f"## `pl.{name}`" in page
        if path is None:
            assert not callable(getattr(perturb_lens, name))
            continue
        module, _, attr = path.rpartition(".")
        assert getattr(importlib.import_module(module), attr) is getattr(perturb_lens, name)
        assert f"::: {path}\n" in page
    assert len(hooks.api_entries()) == len(perturb_lens.__all__)


# ---- the built site -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """``mkdocs build --strict`` into a temporary folder: (the folder, seconds it took)."""
    out = tmp_path_factory.mktemp("site")
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(REPO / "src")},
    )
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    return out, seconds


RESOURCE = re.compile(r"""<(?:script|link|img|iframe|source)\b[^>]*?\b(?:src|href)=["']([^"']+)""")


def test_site_builds_strictly_and_offline(site: tuple[Path, float]) -> None:
    """The strict build succeeds; every page of the nav is there; no page loads anything from
    the network (fonts, scripts, styles, images), and the search index is inlined as a script
    (the offline plugin), next to the local iframe-worker shim that search needs on file://."""
    out, seconds = site
    pages = sorted(out.rglob("*.html"))
    for page in nav_pages():
        assert (out / page.replace(".md", ".html")).is_file(), page
    for html in pages:
        for url in RESOURCE.findall(html.read_text()):
            assert not re.match(r"^(https?:)?//", url), f"{html.name} loads {url}"
    for css in out.rglob("*.css"):
        assert not re.search(r"@import\s+url\(\s*['\"]?https?:", css.read_text()), css
    assert (out / "search" / "search_index.js").read_text().startswith("var __index =")
    index = (out / "index.html").read_text()
    assert "iframe-worker-shim.js" in index and "unpkg.com" not in index
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"site: {len(pages)} pages, built in {seconds:.1f} s, {size / 1e6:.1f} MB")


def test_built_cli_reference_lists_every_command(site: tuple[Path, float]) -> None:
    """The built CLI page has a heading per command of the app."""
    html = (site[0] / "reference" / "cli.html").read_text()
    import typer

    walk = _hooks().walk_commands(typer.main.get_command(app))
    for path, _ in walk:
        assert re.search(rf"<h\d id=[^>]*>perturb-lens {' '.join(path)}<", html), path


def test_site_search_works_from_disk(site: tuple[Path, float], request: pytest.FixtureRequest):
    """In headless Chromium, the site opened as file:// finds a page by a word of its text, and
    every script, style sheet and image it holds is a file (skips without Chromium, as the
    report's test)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = request.getfixturevalue("browser")  # tests/test_report_browser.py's fixture
    driver.get((site[0] / "index.html").as_uri())
    driver.execute_script("document.querySelector('label[for=__search]').click()")
    box = driver.find_element(By.CSS_SELECTOR, "input.md-search__input")
    box.send_keys("plateau")
    items = WebDriverWait(driver, 30).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".md-search-result__item")
    )
    assert any("plateaus" in i.get_attribute("innerHTML") for i in items)
    # what the page holds now (scripts added by Material and the search shim included)
    loaded = driver.execute_script(
        "return [...document.querySelectorAll('script[src], link[href], img[src]')]"
        ".map(e => e.src || e.href)"
    )
    assert len(loaded) >= 3 and all(url.startswith("file://") for url in loaded), loaded
    # the search worker ran in the local shim's hidden iframe (Chromium refuses file:// workers)
    assert driver.execute_script("return document.querySelectorAll('body > iframe[hidden]').length")
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
