"""The `alert_sink` resource: WeDefiDaily's "Alert" table plus the optional webhook."""

import logging
import os
from typing import Optional
from urllib.parse import urlsplit

import dagster as dg

from wedefi_pipelines.health.alerting import AlertSink, Webhook
from wedefi_pipelines.resources.database import ConfigurationError, Database

ENV_WEBHOOK = "ALERT_WEBHOOK_URL"


def webhook_from(url: Optional[str], database: Database) -> Optional[Webhook]:
    """A Webhook for `url` with the settings' timeout and retries; None when no URL is set."""
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigurationError(f"{ENV_WEBHOOK} must be an http(s) URL (a Slack incoming webhook), got {url!r}")
    mon = database.settings.monitoring
    return Webhook(url, mon.webhook_timeout_s, mon.webhook_attempts, mon.webhook_backoff_s)


class AlertSinkResource(dg.ConfigurableResource):
    """Alerts go to the "Alert"/"AlertDelivery" tables through the seed's `alert_processing`
    route (the primary) and, when ALERT_WEBHOOK_URL is set (read when used, so `defs`
    loads without it), to that Slack-compatible webhook as well."""

    webhook_url: Optional[str] = None

    def sink(self, database: Database, logger: Optional[logging.Logger] = None) -> AlertSink:
        webhook = webhook_from(self.webhook_url or os.environ.get(ENV_WEBHOOK), database)
        return AlertSink(lambda: database.connection("alert_processing"), webhook, logger)
