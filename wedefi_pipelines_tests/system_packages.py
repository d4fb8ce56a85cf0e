"""Debian packages some tests need, installed by the test suite itself: Chromium for the
browser test, `promtool` (Debian's `prometheus`) to check the sample alerting rules.

CI runs the README's command (`pip install -e '.[dev]' && pytest`) as root on a fresh
Debian machine, so the UI test installs Debian's `chromium` package when /usr/bin/chromium
is missing: `apt-get install -y --no-install-recommends chromium fonts-liberation`
(`apt-get update` first only if the package lists do not know it). Idempotent: nothing
happens when the browser is there. Never a downloaded browser (no Playwright or
Puppeteer download). Without root or apt-get the test fails saying what to install.

By hand: `python -m wedefi_pipelines_tests.system_packages` (as root).

`promtool` comes the same way: `apt-get install -y --no-install-recommends prometheus`
(the server's service is not started: there is no init system here, and nothing uses it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
PACKAGES = ("chromium", "fonts-liberation")  # fonts: readable text in the screenshot
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}
LOCK_WAIT = ("-o", "DPkg::Lock::Timeout=600")  # another apt run (unattended upgrades) holds the lock


class SystemPackageError(RuntimeError):
    pass


def _apt(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(["apt-get", *LOCK_WAIT, *args], env={**os.environ, **APT_ENV},
                          capture_output=True, text=True, timeout=timeout)


def _ensure(binary: Path, packages: tuple[str, ...]) -> Path:
    """`binary`, installing Debian's `packages` first if it is missing."""
    if binary.exists():
        return binary
    if not shutil.which("apt-get"):
        raise SystemPackageError(f"{binary} is missing and there is no apt-get: install Debian's {' '.join(packages)}")
    if os.geteuid() != 0:
        raise SystemPackageError(f"{binary} is missing: run `sudo apt-get install -y {' '.join(packages)}` "
                                 "(or `sudo python -m wedefi_pipelines_tests.system_packages`)")
    install = ("install", "-y", "--no-install-recommends", *packages)
    result = _apt(*install)
    if result.returncode != 0:  # empty or stale package lists on a fresh machine
        update = _apt("update")
        if update.returncode != 0:
            raise SystemPackageError(f"apt-get update failed:\n{update.stderr[-3000:]}")
        result = _apt(*install)
    if result.returncode != 0 or not binary.exists():
        raise SystemPackageError(f"apt-get install {' '.join(packages)} failed (exit {result.returncode}):\n"
                                 f"{(result.stdout + result.stderr)[-3000:]}")
    return binary


def ensure_chromium() -> Path:
    """/usr/bin/chromium, installing Debian's package first if needed."""
    return _ensure(CHROMIUM, PACKAGES)


PROMTOOL = Path("/usr/bin/promtool")


def ensure_promtool() -> Path:
    """/usr/bin/promtool, from Debian's `prometheus` package."""
    return _ensure(PROMTOOL, ("prometheus",))


if __name__ == "__main__":
    try:
        print(ensure_chromium())
        print(ensure_promtool())
    except SystemPackageError as exc:
        sys.exit(str(exc))
