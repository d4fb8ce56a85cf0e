"""`adopt_database`: `wedefi-pipelines adopt` from the UI (Launchpad), for a database the app's
Prisma schema built. Same code, same resumability: a failed or killed run is resumed by
launching the job again. `plan_only: true` prints the plan and changes nothing."""

import dagster as dg
from pydantic import Field

from wedefi_pipelines.resources.database import DatabaseResource


class AdoptConfig(dg.Config):
    plan_only: bool = Field(False, description="only print what adoption would do (as `adopt --plan`); change nothing")


@dg.op(pool="wedefi_ddl")
def adopt_app_database(context: dg.OpExecutionContext, config: AdoptConfig, database: DatabaseResource) -> dg.Output[dict]:
    """Convert "PriceSnapshot", "PortfolioSnapshot", "PositionSnapshot" and "TokenBalance" to the
    partitioned layout online, verify, swap, record sql/ (docs/adoption.md)."""
    from wedefi_pipelines.adoption.plan import make_plan
    from wedefi_pipelines.adoption.run import adopt

    url = database.db.urls["primary"]
    if config.plan_only:
        text = make_plan(url).as_text()
        context.log.info(text)
        return dg.Output({"plan": text}, metadata={"plan": dg.MetadataValue.md(f"```\n{text}\n```")})
    report = adopt(url, say=context.log.info)
    summary = {
        "outcome": report.outcome,
        "verified": {v.table: {"old_rows": v.old_rows, "new_rows": v.new_rows, "set_aside": v.set_aside}
                     for v in report.verified},
        "swaps": report.swaps,
        "set_aside": report.unplaced,
        "elapsed_s": round(report.elapsed_s, 1),
    }
    return dg.Output(summary, metadata={"outcome": report.outcome, "report": dg.MetadataValue.md(
        f"```\n{report.as_text()}\n```"), "set_aside": dg.MetadataValue.json(report.unplaced),
        "swaps": dg.MetadataValue.json(report.swaps)})


@dg.job(description="Convert a live, Prisma-built WeDefiDaily database to the partitioned layout online "
                    "(wedefi-pipelines adopt). Config plan_only: true prints the plan and changes nothing.")
def adopt_database():
    adopt_app_database()
