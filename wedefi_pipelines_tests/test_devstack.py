"""The embedded stack: the contract's variables, loopback only, nothing left behind."""

import psutil
import redis

from wedefi_pipelines import devstack

CONTRACT = {
    "DATABASE_URL_PRIMARY", "DATABASE_URL_READ", "DATABASE_URL_ANALYTICS", "REDIS_URL", "ARCHIVE_BUCKET",
    "ARCHIVE_PREFIX", "AWS_ENDPOINT_URL_S3", "DAGSTER_PG_URL",
}


def test_stack_exports_the_contract_and_serves_it(stack):
    env = stack.env()
    assert CONTRACT <= set(env)
    assert env["DATABASE_URL_READ"] != env["DATABASE_URL_ANALYTICS"] != env["DATABASE_URL_PRIMARY"]
    assert redis.Redis.from_url(env["REDIS_URL"]).ping()
    buckets = [b["Name"] for b in stack.s3.client().list_buckets()["Buckets"]]
    assert env["ARCHIVE_BUCKET"] in buckets
    assert "export DATABASE_URL_PRIMARY=" in stack.export_lines()


def test_every_server_listens_on_loopback_only(stack):
    pids = [stack.primary.process.pid, stack.redis.process.pid] + [r.process.pid for r in stack.replica_servers.values()]
    for pid in pids:
        listening = [c for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert listening, pid
        assert {c.laddr.ip for c in listening} == {"127.0.0.1"}


def test_stop_leaves_no_process_behind():
    local = devstack.LocalStack(replicas=(devstack.READ_REPLICA,)).start()
    children = [local.primary.process.pid, local.redis.process.pid, local.replica_servers[devstack.READ_REPLICA].process.pid]
    base = local.base_dir
    backends = []
    for pid in children[:1] + children[2:]:
        backends += [p.pid for p in psutil.Process(pid).children(recursive=True)]
    local.stop()
    for pid in children + backends:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid
    assert not base.exists()


def test_a_later_replica_can_be_added_with_pg_basebackup():
    with devstack.LocalStack(replicas=(), with_s3=False, with_redis=False) as local:
        replica = local.add_replica("late_replica")
        assert replica.running
        local.wait_replicas_caught_up()
