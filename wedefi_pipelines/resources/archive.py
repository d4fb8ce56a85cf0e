"""The cold tier's object store: Parquet objects on S3 under a Hive-style month layout.

    s3://$ARCHIVE_BUCKET/$ARCHIVE_PREFIX/<Table>/year=YYYY/month=MM/part-00000.parquet
    s3://$ARCHIVE_BUCKET/$ARCHIVE_PREFIX/_iceberg/<Table>/metadata/...   the Iceberg tables' metadata
    s3://$ARCHIVE_BUCKET/$ARCHIVE_PREFIX/_staging/<Table>/year=YYYY/...   replacements being verified

The `_iceberg` and `_staging` folders sit beside the table folders, not inside them, so a
reader that globs a table's folder never sees metadata or a second copy of an object.

`ArchiveStore` is plain Python (assets, the CLI's `history`, benchmarks and tests share
it); `ArchiveStoreResource` is the Dagster resource "archive", which reads the
configuration contract's variables when a run starts, so `defs` loads anywhere.

Every upload carries a CRC64NVME checksum, which S3 keeps as a full-object checksum even
for multipart uploads (an ETag or a SHA checksum of a multipart object is a composite),
plus our own SHA-256 in the object's metadata. boto3 reads AWS_ENDPOINT_URL_S3 itself;
pyarrow's S3 filesystem does not, so `arrow_filesystem()` passes it explicitly.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from datetime import date
from typing import Any, Mapping, Optional
from urllib.parse import urlparse

import dagster as dg
from awscrt import checksums
from pydantic import PrivateAttr

from wedefi_pipelines import partitioning as p
from wedefi_pipelines.resources.database import ConfigurationError
from wedefi_pipelines.settings import Settings, current_settings

ENV_BUCKET = "ARCHIVE_BUCKET"
ENV_PREFIX = "ARCHIVE_PREFIX"
ENV_ENDPOINT = "AWS_ENDPOINT_URL_S3"
_HELP = {
    ENV_BUCKET: "the bucket of the cold tier (run `wedefi-pipelines stack` for a local one)",
    ENV_PREFIX: "the key prefix under which the cold tier's tables live, e.g. 'archive'",
}
_CHUNK = 8 * 1024 * 1024
ICEBERG_DIR = "_iceberg"
STAGING_DIR = "_staging"


class ArchiveStoreError(RuntimeError):
    """S3 refused or could not be reached; the message names the bucket and key."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    crc64nvme: str | None  # base64 of the big-endian CRC, as S3 reports it
    checksum_type: str | None
    metadata: dict[str, str]


@dataclass(frozen=True)
class FileDigest:
    size: int
    sha256: str
    crc64nvme: str


def crc64nvme_b64(value: int) -> str:
    return base64.b64encode(value.to_bytes(8, "big")).decode()


def file_digest(path: str | os.PathLike) -> FileDigest:
    """Size, SHA-256 and CRC64NVME of a local file, read once in chunks."""
    sha, crc, size = hashlib.sha256(), 0, 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
            crc = checksums.crc64nvme(chunk, crc)
            size += len(chunk)
    return FileDigest(size, sha.hexdigest(), crc64nvme_b64(crc))


class ArchiveStore:
    def __init__(
        self, bucket: str, prefix: str, endpoint_url: str | None = None,
        settings: Settings | None = None, region: str | None = None, credentials: Mapping[str, str] | None = None,
    ) -> None:
        if not bucket:
            raise ConfigurationError(f"{ENV_BUCKET} is not set: {_HELP[ENV_BUCKET]}")
        if not prefix or not prefix.strip("/"):
            raise ConfigurationError(f"{ENV_PREFIX} is not set: {_HELP[ENV_PREFIX]}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or None
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.settings = settings or current_settings()
        # explicit keys when the caller's environment mapping has them, else the standard AWS chain
        self.credentials = dict(credentials or {})
        self._client = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, settings: Settings | None = None) -> "ArchiveStore":
        """From ARCHIVE_BUCKET, ARCHIVE_PREFIX and (optionally: unset means AWS itself)
        AWS_ENDPOINT_URL_S3; a missing required variable is named in the error."""
        env = os.environ if env is None else env
        for name in (ENV_BUCKET, ENV_PREFIX):
            if not env.get(name, "").strip("/"):
                raise ConfigurationError(f"{name} is not set: {_HELP[name]}")
        keys = {"aws_access_key_id": env.get("AWS_ACCESS_KEY_ID"), "aws_secret_access_key": env.get("AWS_SECRET_ACCESS_KEY"),
                "aws_session_token": env.get("AWS_SESSION_TOKEN")}
        return cls(env[ENV_BUCKET], env[ENV_PREFIX], env.get(ENV_ENDPOINT), settings=settings,
                   region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
                   credentials={k: v for k, v in keys.items() if v} if keys["aws_access_key_id"] else None)

    # -- naming ---------------------------------------------------------------------------
    def month_prefix(self, table: str, month: date) -> str:
        return f"{self.prefix}/{table}/{p.s3_month_path(month)}/"

    def object_key(self, table: str, month: date, part: int) -> str:
        return f"{self.month_prefix(table, month)}part-{part:05d}.parquet"

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def key_of(self, uri: str) -> str:
        """The key of an s3://bucket/key URI of this store's bucket."""
        head = f"s3://{self.bucket}/"
        if not uri.startswith(head):
            raise ValueError(f"{uri} is not in the archive bucket s3://{self.bucket}/")
        return uri[len(head):]

    def iceberg_location(self, table: str | None = None) -> str:
        """Where the Iceberg tables keep their metadata (outside the Hive table folders)."""
        base = f"s3://{self.bucket}/{self.prefix}/{ICEBERG_DIR}"
        return f"{base}/{table}" if table else base

    def staging_key(self, key: str) -> str:
        """Where a replacement of the object at `key` is written and verified before it is swapped in."""
        if not key.startswith(self.prefix + "/"):
            raise ValueError(f"{key} is not under the archive prefix {self.prefix}/")
        return f"{self.prefix}/{STAGING_DIR}/{key[len(self.prefix) + 1:]}"

    def where(self) -> str:
        endpoint = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}/{endpoint}"

    # -- client ---------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            cfg = self.settings.archive
            self._client = boto3.client(
                "s3", endpoint_url=self.endpoint_url, region_name=self.region, **self.credentials,
                config=Config(
                    retries={"max_attempts": cfg.s3_max_attempts, "mode": "standard"},
                    connect_timeout=cfg.s3_connect_timeout_s, read_timeout=cfg.s3_read_timeout_s,
                    request_checksum_calculation="when_required", response_checksum_validation="when_required",
                ),
            )
        return self._client

    def _fail(self, action: str, key: str, exc: Exception) -> ArchiveStoreError:
        return ArchiveStoreError(f"S3 {action} of {self.uri(key)} failed{self._endpoint_note()}: {exc}")

    def _endpoint_note(self) -> str:
        return f" (endpoint {self.endpoint_url})" if self.endpoint_url else ""

    # -- operations -----------------------------------------------------------------------
    def upload(self, path: str | os.PathLike, key: str, digest: FileDigest, metadata: Mapping[str, str]) -> None:
        """Upload with a CRC64NVME full-object checksum (S3 rejects the object if it differs)
        and our SHA-256 in the object metadata; multipart above the configured chunk."""
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError

        chunk = self.settings.archive.multipart_chunk_mb * 1024 * 1024
        extra = {
            "ChecksumAlgorithm": "CRC64NVME",
            "Metadata": {"sha256": digest.sha256, **{k: str(v) for k, v in metadata.items()}},
            "ContentType": "application/vnd.apache.parquet",
        }
        try:
            if digest.size < chunk:
                with open(path, "rb") as body:
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ChecksumCRC64NVME=digest.crc64nvme,
                                           **extra)
            else:
                self.client.upload_file(
                    str(path), self.bucket, key, ExtraArgs=extra,
                    Config=TransferConfig(multipart_threshold=chunk, multipart_chunksize=chunk, max_concurrency=4),
                )
        except (BotoCoreError, ClientError, OSError) as exc:
            raise self._fail("upload", key, exc) from exc

    def head(self, key: str) -> ObjectInfo | None:
        """Size, full-object CRC64NVME and metadata as S3 reports them; None if absent."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._fail("head_object", key, exc) from exc
        except BotoCoreError as exc:
            raise self._fail("head_object", key, exc) from exc
        return ObjectInfo(key, head["ContentLength"], head.get("ChecksumCRC64NVME"), head.get("ChecksumType"),
                          dict(head.get("Metadata") or {}))

    def download(self, key: str, dest: str | os.PathLike) -> FileDigest:
        """Stream the object into `dest`, hashing what arrived (SHA-256 and CRC64NVME)."""
        from botocore.exceptions import BotoCoreError, ClientError

        sha, crc, size = hashlib.sha256(), 0, 0
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            with open(dest, "wb") as out:
                for chunk in body.iter_chunks(_CHUNK):
                    out.write(chunk)
                    sha.update(chunk)
                    crc = checksums.crc64nvme(chunk, crc)
                    size += len(chunk)
        except (BotoCoreError, ClientError, OSError) as exc:
            raise self._fail("download", key, exc) from exc
        return FileDigest(size, sha.hexdigest(), crc64nvme_b64(crc))

    def copy(self, source: str, dest: str) -> None:
        """Server-side copy (multipart above 5 GB), with a fresh CRC64NVME full-object
        checksum and the source's metadata: S3 replaces `dest` atomically, so a reader
        sees the old object or the new one, never a mix."""
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError

        chunk = self.settings.archive.multipart_chunk_mb * 1024 * 1024
        try:
            self.client.copy({"Bucket": self.bucket, "Key": source}, self.bucket, dest,
                             ExtraArgs={"ChecksumAlgorithm": "CRC64NVME", "MetadataDirective": "COPY"},
                             Config=TransferConfig(multipart_threshold=max(chunk, 5 * 1024 ** 3)))
        except (BotoCoreError, ClientError) as exc:
            raise self._fail(f"copy from {self.uri(source)}", dest, exc) from exc

    def list_keys(self, prefix: str) -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        keys: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                keys.extend(obj["Key"] for obj in page.get("Contents", []))
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("listing", prefix, exc) from exc
        return sorted(keys)

    def delete(self, keys: list[str]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        for start in range(0, len(keys), 1000):
            batch = keys[start:start + 1000]
            try:
                result = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            except (BotoCoreError, ClientError) as exc:
                raise self._fail("delete", batch[0], exc) from exc
            if result.get("Errors"):
                raise ArchiveStoreError(f"S3 refused to delete {result['Errors']}")

    def _frozen_credentials(self):
        import boto3

        credentials = boto3.session.Session(**self.credentials).get_credentials()  # what boto3 uses
        return credentials.get_frozen_credentials() if credentials is not None else None

    def arrow_filesystem(self):
        """pyarrow's S3 filesystem on the same endpoint (it ignores AWS_ENDPOINT_URL_S3)."""
        from pyarrow import fs

        kwargs: dict[str, Any] = {"region": self.region,
                                  "connect_timeout": self.settings.archive.s3_connect_timeout_s,
                                  "request_timeout": self.settings.archive.s3_read_timeout_s}
        if self.endpoint_url:
            parsed = urlparse(self.endpoint_url)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
        frozen = self._frozen_credentials()
        if frozen is not None:
            kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key, session_token=frozen.token)
        return fs.S3FileSystem(**kwargs)

    def iceberg_properties(self) -> dict[str, str]:
        """pyiceberg's S3 FileIO properties for the same endpoint, region and credentials."""
        props = {"s3.region": self.region,
                 "s3.connect-timeout": str(self.settings.archive.s3_connect_timeout_s),
                 "s3.request-timeout": str(self.settings.archive.s3_read_timeout_s)}
        if self.endpoint_url:
            props["s3.endpoint"] = self.endpoint_url
        frozen = self._frozen_credentials()
        if frozen is not None:
            props.update({"s3.access-key-id": frozen.access_key, "s3.secret-access-key": frozen.secret_key})
            if frozen.token:
                props["s3.session-token"] = frozen.token
        return props


class ArchiveStoreResource(dg.ConfigurableResource):
    """The cold tier's S3 location (resource key "archive").

    Fields left unset come from ARCHIVE_BUCKET, ARCHIVE_PREFIX and AWS_ENDPOINT_URL_S3
    when a step first uses the store; a missing bucket or prefix fails that run naming the
    variable. An unset endpoint means AWS's own S3; credentials follow the standard AWS chain.
    """

    bucket: Optional[str] = None
    prefix: Optional[str] = None
    endpoint_url: Optional[str] = None

    _store: Optional[ArchiveStore] = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._store = None

    @property
    def store(self) -> ArchiveStore:
        if self._store is None:
            env = dict(os.environ)
            for name, value in ((ENV_BUCKET, self.bucket), (ENV_PREFIX, self.prefix), (ENV_ENDPOINT, self.endpoint_url)):
                if value:
                    env[name] = value
            self._store = ArchiveStore.from_env(env)
        return self._store

