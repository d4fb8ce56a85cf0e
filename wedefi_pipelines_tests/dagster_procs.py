"""Real `dagster-daemon` and `dagster-webserver` processes for the operations tests.

Each test gets a fresh `dagster` database on the test stack's primary and a temporary
DAGSTER_HOME holding a copy of the repository's `dagster.yaml`, so the processes run
exactly the instance users run (PostgreSQL storage, QueuedRunCoordinator, retries), with
the code location loaded from the repository's `workspace.yaml`. The app's configuration
contract (DATABASE_URL_*, REDIS_URL, S3) points at the test's own database.

Processes start in their own session, so everything they spawn (code servers, run
workers) is found afterwards by session id: `stop()` sends SIGTERM, waits, and reports
any process of the session still alive, then kills those (they are ours).

Waits poll with a deadline (`wait_for`); no test asserts on elapsed time.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
import requests
import yaml
from dagster import DagsterInstance
from dagster._core.instance.ref import InstanceRef
from psycopg import sql

from wedefi_pipelines.instance import instance_environment
from wedefi_pipelines_tests.conftest import _selected_flavors

REPO = Path(__file__).resolve().parent.parent
WORKSPACE = REPO / "workspace.yaml"
LOCATION = "wedefi_pipelines"  # workspace.yaml's location_name
# Variables of the caller's environment that must not leak into the processes' instance.
DAGSTER_VARS = ("DAGSTER_HOME", "DAGSTER_PG_URL", "DAGSTER_IS_DEV_CLI", "WEDEFI_THROWAWAY_DAGSTER_DIR",
                "WEDEFI_SETTINGS")
T = TypeVar("T")


def one_flavor() -> pytest.MarkDecorator:
    """Run a module once, on PostgreSQL 18 when selected: what these tests prove is Dagster's
    (daemon, webserver, UI), not the server's. Reuses the session's stack of that flavour."""
    chosen = _selected_flavors()
    return pytest.mark.parametrize("stack", ["pg18" if "pg18" in chosen else chosen[0]], indirect=True)


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 1.0,
             diagnose: Callable[[], str] | None = None) -> T:
    """Polls `probe` until it returns something truthy; fails naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            details = diagnose() if diagnose else ""
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}" + (f"\n{details}" if details else ""))
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def script(name: str) -> str:
    """The console script installed next to this interpreter (the pinned Dagster's)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed (pip install -e '.[dev]')")
    return found


# -- processes, found through /proc ------------------------------------------------------


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    sid: int
    state: str
    start: int  # clock ticks after boot: tells a pid apart from a later reuse of it
    cmdline: str


def _proc(pid: int) -> ProcInfo | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return ProcInfo(pid, int(fields[1]), int(fields[3]), fields[0], int(fields[19]), cmdline)


def _all_procs() -> list[ProcInfo]:
    procs = (_proc(int(entry)) for entry in os.listdir("/proc") if entry.isdigit())
    return [p for p in procs if p is not None]


def session_processes(sid: int) -> list[ProcInfo]:
    """Live (not zombie) processes of a session."""
    return [p for p in _all_procs() if p.sid == sid and p.state != "Z"]


def descendants(pid: int) -> list[ProcInfo]:
    procs = _all_procs()
    found, frontier = [], {pid}
    while frontier:
        children = [p for p in procs if p.ppid in frontier and p.state != "Z"]
        found += children
        frontier = {p.pid for p in children}
    return found


@dataclass
class StopResult:
    returncode: int | None  # None: it did not exit on SIGTERM within the timeout (then killed)
    leftovers: list[ProcInfo]  # processes it started that outlived it (then killed)


@dataclass
class DagsterProcess:
    """A dagster CLI process in its own session, its output in `log_path`."""

    name: str
    args: list[str]
    env: Mapping[str, str]
    log_path: Path
    proc: subprocess.Popen = field(init=False)
    seen: dict[int, ProcInfo] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.args, cwd=REPO, env=dict(self.env), stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"--- last lines of {self.log_path} ---\n" + "\n".join(text.splitlines()[-lines:])

    def assert_running(self) -> None:
        if not self.running():
            pytest.fail(f"{self.name} exited with code {self.proc.returncode}\n{self.log_tail()}")

    def note_children(self) -> list[ProcInfo]:
        """Records the processes it has started so far (their ids and start times)."""
        children = descendants(self.pid)
        self.seen.update({p.pid: p for p in children})
        return children

    def stop(self, timeout: float = 60.0, grace: float = 10.0) -> StopResult:
        """SIGTERM, then wait; anything of its session (or seen as its child) still alive
        `grace` s after it exits is a leftover. Kills whatever did not stop."""
        if self.running():
            self.note_children()
            self.proc.send_signal(signal.SIGTERM)
        try:
            returncode: int | None = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = None
            self.proc.kill()
            self.proc.wait(timeout=30)

        def alive() -> list[ProcInfo]:
            session = {p.pid: p for p in session_processes(self.pid)}
            for pid, info in self.seen.items():
                now = _proc(pid)
                if now is not None and now.start == info.start and now.state != "Z":
                    session[pid] = now
            return list(session.values())

        deadline = time.monotonic() + grace
        leftovers = alive()
        while leftovers and time.monotonic() < deadline:
            time.sleep(0.5)
            leftovers = alive()
        for p in leftovers:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return StopResult(returncode, leftovers)


# -- the instance --------------------------------------------------------------------------


@dataclass
class DagsterSetup:
    """A temporary DAGSTER_HOME on a fresh `dagster` database, and the processes' environment."""

    home: Path
    url: str
    env: dict[str, str]
    logs: Path
    processes: list[DagsterProcess] = field(default_factory=list)

    def _start(self, name: str, args: list[str]) -> DagsterProcess:
        process = DagsterProcess(name, args, self.env, self.logs / f"{name}.log")
        self.processes.append(process)
        return process

    def start_daemon(self) -> DagsterProcess:
        return self._start("dagster-daemon", [script("dagster-daemon"), "run", "-w", str(WORKSPACE)])

    def start_webserver(self, timeout: float = 240.0) -> Webserver:
        port = free_port()
        process = self._start("dagster-webserver", [
            script("dagster-webserver"), "-w", str(WORKSPACE), "-h", "127.0.0.1", "-p", str(port)])
        server = Webserver(process, f"http://127.0.0.1:{port}")
        server.wait_loaded(timeout)
        return server

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)

    def connect(self) -> psycopg.Connection:
        """The `dagster` database itself."""
        return psycopg.connect(self.url, autocommit=True)

    @contextmanager
    def instance(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[DagsterInstance]:
        """The same instance, in this process (its storages read DAGSTER_PG_URL when created)."""
        monkeypatch.setenv("DAGSTER_HOME", str(self.home))
        monkeypatch.setenv("DAGSTER_PG_URL", self.url)
        with DagsterInstance.from_ref(InstanceRef.from_dir(str(self.home))) as instance:
            yield instance

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            if process.running():
                process.stop()


def _create_storage(home: Path, url: str) -> None:
    """Creates the storage's tables and pool limits once, before processes start at once:
    two processes creating them together on an empty database race (a daemon started
    while `dagster-daemon liveness-check` runs dies on a duplicate concurrency_limits key)."""
    with instance_environment(home, url), DagsterInstance.from_ref(InstanceRef.from_dir(str(home))):
        pass


@contextmanager
def dagster_setup(stack, app_env: Mapping[str, str], logs: Path,
                  settings: Mapping[str, Any] | None = None) -> Iterator[DagsterSetup]:
    """A fresh `dagster` database and DAGSTER_HOME; `settings` become the processes' $WEDEFI_SETTINGS.

    Processes started through the setup are stopped (SIGTERM, then killed) on exit, and
    the database dropped.
    """
    name = "dagster_" + uuid.uuid4().hex[:10]
    stack.create_database(name)
    url = stack.primary.url(name)
    if logs.exists():
        shutil.rmtree(logs)
    home = logs / "dagster_home"
    home.mkdir(parents=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {k: v for k, v in os.environ.items() if k not in DAGSTER_VARS and not k.startswith("PYTEST_")}
    env.update(app_env)
    env.update({"DAGSTER_HOME": str(home), "DAGSTER_PG_URL": url, "PYTHONUNBUFFERED": "1"})
    if settings is not None:
        path = logs / "settings.yaml"
        path.write_text(yaml.safe_dump(dict(settings)))
        env["WEDEFI_SETTINGS"] = str(path)
    setup = DagsterSetup(home, url, env, logs)
    try:
        _create_storage(home, url)
        yield setup
    finally:
        setup.stop_all()
        with psycopg.connect(stack.primary.url("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


# -- the webserver's GraphQL API -------------------------------------------------------------


class GraphQLError(AssertionError):
    pass


def _python_errors(value: Any) -> list[str]:
    """Every PythonError object (message and stack) anywhere in a GraphQL response."""
    found = []
    if isinstance(value, dict):
        if value.get("__typename") == "PythonError":
            found.append(f"{value.get('message', '')}\n{''.join(value.get('stack') or [])}")
        for item in value.values():
            found += _python_errors(item)
    elif isinstance(value, list):
        for item in value:
            found += _python_errors(item)
    return found


@dataclass
class Webserver:
    process: DagsterProcess
    base_url: str

    def graphql(self, query: str, variables: Mapping[str, Any] | None = None, timeout: float = 120.0) -> dict:
        """POSTs to /graphql; raises with the server's PythonError (message and stack) when
        the answer is an error: HTTP 500 with a JSON body, GraphQL `errors`, or a
        `PythonError` member of a union in the data."""
        response = requests.post(f"{self.base_url}/graphql", json={"query": query, "variables": variables or {}},
                                 timeout=timeout)
        try:
            body = response.json()
        except ValueError:
            raise GraphQLError(f"HTTP {response.status_code} from /graphql, not JSON:\n{response.text[:3000]}")
        errors = _python_errors(body)
        if response.status_code != 200 or body.get("errors") or errors:
            raise GraphQLError(f"HTTP {response.status_code} from /graphql: {body.get('errors')}\n"
                               + "\n".join(errors))
        return body["data"]

    def run_events(self, run_id: str, last: int = 40) -> str:
        """The run's last event messages with their errors, to explain a failure."""
        data = self.graphql("""
            query RunEvents($runId: ID!) { logsForRun(runId: $runId, limit: 1000) { __typename
              ... on EventConnection { events { ... on MessageEvent { eventType message stepKey }
                                                ... on ErrorEvent { error { message stack } } } } } }""",
                            {"runId": run_id})
        lines = []
        for event in data["logsForRun"].get("events", [])[-last:]:
            lines.append(f"{event.get('eventType')} {event.get('stepKey') or ''}: {event.get('message', '')}")
            if event.get("error"):
                lines.append(event["error"]["message"] + "".join(event["error"]["stack"] or []))
        return f"--- events of run {run_id} ---\n" + "\n".join(lines)

    def location_status(self) -> str:
        """The load status of the workspace's code location; a load error raises with its stack."""
        data = self.graphql("""
            query { workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
              locationOrLoadError { __typename ... on PythonError { message stack } } } } } }""")
        entries = {e["name"]: e["loadStatus"] for e in data["workspaceOrError"].get("locationEntries", [])}
        return entries.get(LOCATION, "MISSING")

    def wait_loaded(self, timeout: float) -> None:
        def loaded() -> bool:
            self.process.assert_running()
            try:
                return self.location_status() == "LOADED"
            except (requests.ConnectionError, requests.Timeout):
                return False

        wait_for(f"the webserver to load {LOCATION}", loaded, timeout, diagnose=self.process.log_tail)
