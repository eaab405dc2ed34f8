"""The HTML report in headless Chromium: every figure renders, the controls work, no console errors.

Needs the Debian packages ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and
selenium (dev extra); skips with the reason otherwise. Screenshots go to the test's tmp dir and to
``.pytest_cache/screenshots/``. ``PERTURB_LENS_REPORT=path/to/report.html`` checks (and
screenshots) that report instead of a synthetic one, e.g. a real run's.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from synthetic_runs import make_run, small_config

from perturb_lens.plots import write_report

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / ".pytest_cache" / "screenshots"


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip(
            "headless Chromium is absent (need `apt-get install chromium chromium-driver`; "
            f"found chromium={chromium}, chromedriver={driver})"
        )
    return chromium, driver


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    chromium, driver_path = _browser_paths()
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (dev extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        "--hide-scrollbars",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("PERTURB_LENS_REPORT")
    if given:
        return Path(given).resolve()
    run = make_run(tmp_path_factory.mktemp("browser") / "run copy", small_config())
    return write_report(run, formats=("svg",), log_y=True)


def _full_page_screenshot(driver, path: Path) -> None:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(int(height) + 40, 16000))
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))


def test_report_renders_without_console_errors(browser, report: Path, tmp_path: Path) -> None:
    driver = browser
    driver.get(report.as_uri())
    assert driver.execute_script("return document.readyState") == "complete"
    html = report.read_text()
    expected = re.findall(r'<figure class="plot" id="fig-[^"]+" data-figure="([^"]+)"', html)
    assert expected
    if "sensitive-directions" in html and not os.environ.get("PERTURB_LENS_REPORT"):
        assert 'class="logy"' in html  # curve figures offer a log axis
    for name in expected:
        svg = driver.find_element("css selector", f'figure[data-figure="{name}"] .view-lin svg')
        size = svg.size
        assert svg.is_displayed() and size["width"] > 300 and size["height"] > 150, name
    for table in driver.find_elements("css selector", "table"):
        assert table.is_displayed()

    # the controls: hide a series everywhere, switch a figure to log y
    box = driver.find_element("css selector", "#toggles input")
    slug = box.get_attribute("data-series")
    hidden = f'[id*="-pl--{slug}--"]'
    assert driver.find_elements("css selector", hidden)
    box.click()
    assert not any(e.is_displayed() for e in driver.find_elements("css selector", hidden))
    box.click()
    for button in driver.find_elements("css selector", "button.logy")[:1]:  # curve figures
        figure = button.find_element("xpath", "./ancestor::figure")
        button.click()
        assert figure.find_element("css selector", ".view-log svg").is_displayed()
        assert not figure.find_element("css selector", ".view-lin").is_displayed()
        button.click()

    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
    name = f"{report.parent.name.replace(' ', '_')}_{report.stem}.png"
    _full_page_screenshot(driver, tmp_path / name)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp_path / name, SCREENSHOTS / name)
    assert (tmp_path / name).stat().st_size > 10_000
