"""docker/: everything that can be proven without a Docker engine.

- compose.yaml: `docker-compose config -q` with the example env file, refused without the
  secrets, and the deployment's shape read from the resolved config;
- Dockerfile: hadolint, and its own CMD and HEALTHCHECK run here: the code server it
  starts serves our definitions, and docker/workspace.yaml loads them from it;
- the shell scripts: shellcheck; the image's pins: docker/constraints.txt against
  pyproject.toml and the installed dependency tree;
- docker/dagster.yaml: loaded with its DockerRunLauncher and S3ComputeLogManager, then
  used: a materialization stores its events in PostgreSQL and its compute logs in S3
  (the stack's S3 server, buckets made by docker/s3/create_buckets.py).
"""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from datetime import datetime, timedelta, timezone
from importlib import metadata
from pathlib import Path

import boto3
import dagster as dg
import psycopg
import pytest
import yaml
from dagster._core.instance.ref import InstanceRef
from dagster_aws.s3.compute_log_manager import S3ComputeLogManager
from dagster_docker import DockerRunLauncher
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from psycopg import sql

from wedefi_pipelines import devstack
from wedefi_pipelines.instance import purge_runs
from wedefi_pipelines_tests.cli_defs import MARKER_DIR_ENV, cli_ok

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
SECRETS = ("POSTGRES_PASSWORD", "REPLICATION_PASSWORD", "DAGSTER_PG_PASSWORD", "REDIS_PASSWORD",
           "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "DOCKER_GID")
DAGSTER_SERVICES = ("user-code", "webserver", "daemon")

# docker/s3/create_buckets.py, the s3-init service's script (not part of the package)
_spec = importlib.util.spec_from_file_location("create_buckets", DOCKER / "s3" / "create_buckets.py")
create_buckets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(create_buckets)


def _env_without_secrets() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in SECRETS}


def _compose(env_file: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker-compose", "-f", str(DOCKER / "compose.yaml"), "--env-file", str(env_file), *args],
                          env=_env_without_secrets(), capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def compose_config(tmp_path_factory) -> dict:
    env_file = tmp_path_factory.mktemp("compose") / "env"
    shutil.copy(DOCKER / ".env.example", env_file)
    result = _compose(env_file, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (DOCKER / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _exec_form(arguments: str) -> list[str]:
    return json.loads(arguments[arguments.index("["):])


# -- compose --------------------------------------------------------------------------------


def test_compose_config_is_valid_with_the_example_env_file(tmp_path):
    env_file = tmp_path / "env"
    shutil.copy(DOCKER / ".env.example", env_file)
    result = _compose(env_file, "config", "-q")
    assert result.returncode == 0, result.stderr


def test_compose_refuses_to_start_without_its_secrets(tmp_path):
    empty = tmp_path / "env"
    empty.write_text("")
    result = _compose(empty, "config", "-q")
    assert result.returncode != 0
    for secret in SECRETS:
        assert f"required variable {secret} is missing a value: set {secret} in docker/.env" in result.stderr


def test_only_the_webserver_is_published_and_only_on_loopback(compose_config):
    published = {name: svc["ports"] for name, svc in compose_config["services"].items() if svc.get("ports")}
    assert set(published) == {"webserver"}
    assert [(p["host_ip"], p["target"]) for p in published["webserver"]] == [("127.0.0.1", 3000)]


def test_services_wait_for_healthy_dependencies(compose_config):
    services = compose_config["services"]
    image_has_healthcheck = any(i == "HEALTHCHECK" for i, _ in _dockerfile_instructions())
    for name, svc in services.items():
        for dependency, spec in svc.get("depends_on", {}).items():
            if dependency == "s3-init":  # a one-shot job: wait for it to finish successfully
                assert spec["condition"] == "service_completed_successfully"
                continue
            assert spec["condition"] == "service_healthy", (name, dependency)
            dep = services[dependency]
            assert dep.get("healthcheck") or (dep.get("build") and image_has_healthcheck), dependency
    assert set(services["webserver"]["depends_on"]) >= {"user-code", "dagster-postgres"}
    assert set(services["daemon"]["depends_on"]) >= {"user-code", "dagster-postgres"}
    assert services["postgres-replica"]["depends_on"]["postgres-primary"]["condition"] == "service_healthy"


def test_images_are_pinned_maintained_and_official(compose_config):
    images = {name: svc["image"] for name, svc in compose_config["services"].items()}
    for name, image in images.items():
        assert ":" in image and not image.endswith(":latest"), (name, image)
        assert "bitnami" not in image
    for name in ("postgres-primary", "postgres-replica", "dagster-postgres"):
        assert re.fullmatch(r"postgres:\d+\.\d+-\w+", images[name])
    minio = re.fullmatch(r"quay\.io/minio/minio:RELEASE\.(\d{4})-\d\d-\d\dT[\d-]+Z", images["minio"])
    assert minio and int(minio.group(1)) >= 2025  # full-object CRC64NVME checksums
    base = next(args for i, args in _dockerfile_instructions() if i == "FROM")
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base)


def test_postgres_primary_and_replica_preload_pg_stat_statements(compose_config):
    services = compose_config["services"]
    for name in ("postgres-primary", "postgres-replica"):
        assert "shared_preload_libraries=pg_stat_statements" in services[name]["command"]
    replica = services["postgres-replica"]
    assert replica["entrypoint"] == ["/usr/local/bin/replica-entrypoint.sh"]
    assert replica["environment"]["REPLICA_NAME"] == "wedefi_read"
    script = (DOCKER / "postgres" / "replica-entrypoint.sh").read_text()
    assert "pg_basebackup" in script and "--write-recovery-conf" in script
    assert "application_name=$REPLICA_NAME" in script and 'exec docker-entrypoint.sh "$@"' in script
    init = services["postgres-primary"]["volumes"]
    assert any(v["target"].startswith("/docker-entrypoint-initdb.d/") for v in init)


def test_dagster_services_share_the_image_and_the_launcher_finds_it(compose_config):
    services = compose_config["services"]
    images = {services[name]["image"] for name in (*DAGSTER_SERVICES, "s3-init")}
    assert len(images) == 1
    assert services["user-code"]["environment"]["DAGSTER_CURRENT_IMAGE"] == images.pop()
    assert compose_config["networks"]["wedefi"]["name"] == "wedefi"
    launcher = yaml.safe_load((DOCKER / "dagster.yaml").read_text())["run_launcher"]["config"]
    assert launcher["network"] == "wedefi"
    for name in ("webserver", "daemon"):
        assert any(v["target"] == "/var/run/docker.sock" for v in services[name]["volumes"])
        # DockerRunLauncher fails a launch when a variable it forwards is unset in its process
        missing = set(launcher["env_vars"]) - set(services[name]["environment"])
        assert not missing, (name, missing)


def test_secrets_are_never_baked_in():
    compose_text = (DOCKER / "compose.yaml").read_text()
    literal = re.findall(r"^\s*[A-Z_]*(?:PASSWORD|SECRET)[A-Z_]*:\s*(?!\$\{)(\S+)", compose_text, re.MULTILINE)
    assert literal == []
    for instruction, args in _dockerfile_instructions():
        if instruction in ("ENV", "ARG"):
            assert not re.search(r"PASSWORD|SECRET|ACCESS_KEY|_URL", args), args
    launcher = yaml.safe_load((DOCKER / "dagster.yaml").read_text())["run_launcher"]["config"]
    assert all("=" not in name for name in launcher["env_vars"])  # names only, values from the environment
    example = dict(line.split("=", 1) for line in (DOCKER / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert {example[s] for s in SECRETS if "PASSWORD" in s} == {"change-me"}
    ignored = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=REPO)
    assert ignored.returncode == 0, "docker/.env must be git-ignored"


# -- Dockerfile, scripts, pins -----------------------------------------------------------------


def test_hadolint_passes_on_the_dockerfile():
    result = subprocess.run(["hadolint", str(DOCKER / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_the_code_server_as_a_non_root_user():
    instructions = _dockerfile_instructions()
    user = [args for i, args in instructions if i == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    cmd = _exec_form(next(args for i, args in instructions if i == "CMD"))
    assert cmd[:3] == ["dagster", "code-server", "start"] and "wedefi_pipelines.definitions" in cmd
    check = _exec_form(next(args for i, args in instructions if i == "HEALTHCHECK"))
    assert check[:3] == ["dagster", "api", "grpc-health-check"]
    assert check[check.index("-p") + 1] == cmd[cmd.index("-p") + 1]


def test_shell_scripts_pass_shellcheck():
    scripts = sorted((DOCKER / "postgres").glob("*.sh"))
    assert len(scripts) == 2
    result = subprocess.run(["shellcheck", "--shell=sh", *map(str, scripts)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_every_dependency_within_pyproject_ranges():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = _constraints()
    for spec in [*project["dependencies"], *project["optional-dependencies"]["docker"]]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not pinned in docker/constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (spec, pins[name])


def test_constraints_cover_the_whole_installed_dependency_tree():
    """Walks the installed requirements of wedefi-pipelines[docker]: every package reached is pinned."""
    pins = _constraints()
    seen: set[str] = set()
    todo = [("wedefi-pipelines", frozenset({"docker"}))]
    while todo:
        name, extras = todo.pop()
        for spec in metadata.requires(name) or []:
            requirement = Requirement(spec)
            applies = requirement.marker is None or any(
                requirement.marker.evaluate({"extra": extra}) for extra in (extras or {""}))
            dep = canonicalize_name(requirement.name)
            if not applies or dep == "wedefi-pipelines" or (dep, frozenset(requirement.extras)) in seen:
                continue
            seen.add((dep, frozenset(requirement.extras)))
            assert dep in pins, f"{dep} (required by {name}) is not pinned in docker/constraints.txt"
            todo.append((requirement.name, frozenset(requirement.extras)))


def test_the_dockerfile_command_serves_our_code_and_docker_workspace_loads_it(tmp_path):
    """Runs the image's CMD and HEALTHCHECK here (on 127.0.0.1), then loads docker/workspace.yaml against it."""
    instructions = _dockerfile_instructions()
    port = str(devstack.free_port())
    cmd = _exec_form(next(args for i, args in instructions if i == "CMD"))
    cmd[cmd.index("-h") + 1], cmd[cmd.index("-p") + 1] = "127.0.0.1", port
    check = _exec_form(next(args for i, args in instructions if i == "HEALTHCHECK"))
    check[check.index("-p") + 1] = port
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_")}
    log = (tmp_path / "code-server.log").open("w")
    server = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            health = subprocess.run(check, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
            if health.returncode == 0 or server.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert health.returncode == 0, (tmp_path / "code-server.log").read_text()[-3000:]

        workspace = yaml.safe_load((DOCKER / "workspace.yaml").read_text())
        target = workspace["load_from"][0]["grpc_server"]
        assert target["location_name"] == "wedefi_pipelines"
        target.update(host="127.0.0.1", port=int(port))
        (tmp_path / "workspace.yaml").write_text(yaml.safe_dump(workspace))
        result = subprocess.run([sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert "Validation successful for code location wedefi_pipelines" in result.stderr + result.stdout
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


# -- docker/dagster.yaml and the buckets, on the real stack -----------------------------------------


def test_create_buckets_is_idempotent_and_sets_versioning_and_log_expiry(stack, monkeypatch):
    env = {**stack.env(), "ARCHIVE_BUCKET": "archive-" + uuid.uuid4().hex[:8],
           "DAGSTER_LOGS_BUCKET": "logs-" + uuid.uuid4().hex[:8], "DAGSTER_LOG_RETENTION_DAYS": "14"}
    for key, value in env.items():  # boto3 reads the endpoint and credentials from the environment
        monkeypatch.setenv(key, value)
    assert create_buckets.main({**env, "ARCHIVE_BUCKET": ""}) == 64
    assert create_buckets.main(env) == 0
    assert create_buckets.main(env) == 0  # re-run: no error, same settings
    s3 = boto3.client("s3")
    assert s3.get_bucket_versioning(Bucket=env["ARCHIVE_BUCKET"])["Status"] == "Enabled"
    rules = s3.get_bucket_lifecycle_configuration(Bucket=env["DAGSTER_LOGS_BUCKET"])["Rules"]
    assert [(r["Filter"]["Prefix"], r["Expiration"]["Days"]) for r in rules] == [("compute-logs/", 14)]


def _log_keys(bucket: str, run_id: str) -> list[str]:
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="compute-logs/")
    return [o["Key"] for o in listing.get("Contents", []) if run_id in o["Key"]]


def test_docker_dagster_yaml_loads_its_launcher_and_stores_events_and_compute_logs(stack, tmp_path, monkeypatch):
    name = "dagster_" + uuid.uuid4().hex[:10]
    stack.create_database(name)
    logs_bucket = "logs-" + uuid.uuid4().hex[:8]
    env = {**stack.env(), "DAGSTER_PG_URL": stack.primary.url(name), "DAGSTER_LOGS_BUCKET": logs_bucket,
           "ARCHIVE_BUCKET": "archive-" + uuid.uuid4().hex[:8], "DAGSTER_HOME": str(tmp_path / "home")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(MARKER_DIR_ENV, str(tmp_path))
    (tmp_path / "home").mkdir()
    shutil.copy(DOCKER / "dagster.yaml", tmp_path / "home" / "dagster.yaml")
    try:
        assert create_buckets.main(env) == 0
        with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(tmp_path / "home"))) as instance:
            launcher = instance.run_launcher
            assert isinstance(launcher, DockerRunLauncher)
            assert launcher.networks == ["wedefi"] and "DATABASE_URL_PRIMARY" in launcher.env_vars
            assert isinstance(instance.compute_log_manager, S3ComputeLogManager)
            assert {p.name: p.limit for p in instance.event_log_storage.get_pool_limits()}["wedefi_archive"] == 1

            run_id = dg.materialize([cli_ok], instance=instance).run_id
            assert instance.get_latest_materialization_event(dg.AssetKey("cli_ok")).run_id == run_id
            with psycopg.connect(env["DAGSTER_PG_URL"]) as conn:
                stored = conn.execute(
                    "SELECT count(*) FROM event_logs WHERE run_id = %s AND dagster_event_type = %s",
                    (run_id, "ASSET_MATERIALIZATION")).fetchone()[0]
            assert stored == 1
            assert _log_keys(logs_bucket, run_id), "the step's compute logs were not uploaded to S3"

            # Retention removes the run's compute logs from S3 too.
            later = datetime.now(timezone.utc) + timedelta(days=91)
            assert purge_runs(instance, 90, now=later).deleted == [run_id]
            assert _log_keys(logs_bucket, run_id) == []
    finally:
        with psycopg.connect(stack.primary.url("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
