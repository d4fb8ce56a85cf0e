"""The UI in a real browser: `dagster-webserver` on this repository's instance serves the
asset graph (/asset-groups), which headless Chromium (Debian's package, never a
downloaded browser) renders; the screenshot is kept as a test artifact
(artifacts/asset-graph.png) and the rendered DOM must name the assets.

Runs once (PostgreSQL 18): what it proves is Dagster's UI.
"""

import re
import subprocess
import time
from html import unescape
from urllib.parse import urlencode

import pytest

from wedefi_pipelines.definitions import defs
from wedefi_pipelines_tests.dagster_procs import LOCATION, dagster_setup, one_flavor
from wedefi_pipelines_tests.system_packages import SystemPackageError, ensure_chromium

pytestmark = [one_flavor(), pytest.mark.slow]

# A few assets the graph must show whatever else changes; the test checks every asset key of defs.
KEY_ASSETS = {"database_schema", "table_partitions", "partition_horizon", "price_snapshots", "redis_cache"}
GROUPS = {node.key.to_user_string(): node.group_name for node in defs.resolve_asset_graph().asset_nodes}
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--hide-scrollbars", "--window-size=2560,1600")
# Virtual time (ms) the page gets to load and render; a load that did not render the graph yet
# (a slow first answer from the webserver on a loaded machine) is retried with more.
BUDGETS_MS = (15_000, 30_000, 60_000)


@pytest.fixture(scope="module")
def chromium():
    try:
        return ensure_chromium()
    except SystemPackageError as exc:
        pytest.fail(str(exc))


def _graph_url(base_url: str, groups: set[str]) -> str:
    """The asset graph with every group expanded (the UI collapses groups when there are
    several; its `expanded` query parameter lists the group ids it opens, in both the
    global and the per-code-location form)."""
    prefixes = ("global@global", f"__repository__@{LOCATION}")
    ids = [f"{prefix}:{group}" for group in sorted(groups) for prefix in prefixes]
    return f"{base_url}/asset-groups?{urlencode({'expanded': ','.join(ids)})}"


def _chromium(binary, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *CHROMIUM_FLAGS, *args], capture_output=True, text=True, timeout=timeout)


def _visible_text(html: str) -> str:
    """What the page shows: no scripts, styles or attribute values."""
    return unescape(re.sub(r"<[^>]+>", " ", re.sub(r"(?s)<(script|style)\b.*?</\1>", " ", html)))


def test_the_asset_graph_renders_in_headless_chromium(chromium, stack, db, artifacts_dir):
    started = time.monotonic()
    screenshot, dom_file = artifacts_dir / "asset-graph.png", artifacts_dir / "asset-graph.html"
    assert KEY_ASSETS <= set(GROUPS)
    with dagster_setup(stack, db.env, artifacts_dir / "test_ui_browser") as setup:
        web = setup.start_webserver()
        url = _graph_url(web.base_url, set(GROUPS.values()))
        for budget in BUDGETS_MS:
            screenshot.unlink(missing_ok=True)
            # one page load gives both the screenshot and the rendered DOM
            page = _chromium(chromium, f"--virtual-time-budget={budget}", f"--screenshot={screenshot}",
                             "--dump-dom", url)
            assert page.returncode == 0, page.stderr[-3000:]
            dom_file.write_text(page.stdout)
            text = _visible_text(page.stdout)
            missing = sorted(key for key in GROUPS if key not in text)
            if len(missing) < len(GROUPS):  # the graph rendered (names may still be missing: asserted below)
                break
        web.process.assert_running()

    assert not missing, f"asset names not on the rendered page: {missing} (see {dom_file} and {screenshot})"
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert screenshot.stat().st_size > 50_000, "the screenshot looks blank"  # a blank 2560x1600 PNG is ~10 kB
    print(f"\nbrowser test: {len(GROUPS)} assets on the page ({budget} ms virtual time), screenshot {screenshot} "
          f"({screenshot.stat().st_size // 1024} kB), {time.monotonic() - started:.0f} s")
