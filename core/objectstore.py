"""Object store adapter over the ``minio`` SDK (MinIO in production, any S3 API locally)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error

from core.errors import ObjectMissing, ObjectStoreUnavailable
from core.settings import require_secret

if TYPE_CHECKING:
    from core.settings import Settings

_MISSING_CODES = {"NoSuchKey", "NoSuchObject", "NoSuchBucket"}


@contextlib.contextmanager
def _s3_errors(key: str = "") -> Iterator[None]:
    try:
        yield
    except S3Error as exc:
        if exc.code in _MISSING_CODES:
            raise ObjectMissing(f"object {key!r} not found ({exc.code})") from exc
        raise ObjectStoreUnavailable(f"S3 refused {key or 'request'}: {exc.code}") from exc
    except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise ObjectStoreUnavailable(f"S3 unreachable: {exc}") from exc


class ObjectStore:
    def __init__(self, endpoint: str, access_key: str, secret_key: str, bucket: str,
                 secure: bool = False, region: str = "us-east-1", timeout_s: float = 30.0,
                 retries: int = 2, public_url: str = "") -> None:
        # Few, short retries: a store that is down should fail a call in seconds, not minutes.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(3.0, timeout_s), read=timeout_s),
            retries=urllib3.Retry(total=retries, backoff_factor=0.2,
                                  status_forcelist=[500, 502, 503, 504]),
        )
        self._client = Minio(endpoint, access_key=access_key, secret_key=secret_key,
                             secure=secure, region=region, http_client=http)
        # Presigned URLs are signed for the host browsers reach (the signature covers the
        # host); with the region given, signing makes no request.
        public = urlsplit(public_url)
        self._signer = Minio(public.netloc, access_key=access_key, secret_key=secret_key,
                             secure=public.scheme == "https", region=region,
                             http_client=http) if public_url else self._client
        self.bucket = bucket

    @classmethod
    def from_settings(cls, config: Settings, timeout_s: float = 30.0,
                      retries: int = 2) -> ObjectStore:
        return cls(config.s3_endpoint, config.s3_access_key,
                   require_secret(config, "s3_secret_key"),
                   config.s3_bucket, secure=config.s3_secure, region=config.s3_region,
                   timeout_s=timeout_s, retries=retries, public_url=config.s3_public_url)

    def ensure_bucket(self) -> None:
        with _s3_errors(self.bucket):
            if not self._client.bucket_exists(self.bucket):
                with contextlib.suppress(S3Error):  # another process may create it first
                    self._client.make_bucket(self.bucket)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        with _s3_errors(key):
            self._client.put_object(self.bucket, key, io.BytesIO(data), len(data),
                                    content_type=content_type)

    def get(self, key: str) -> bytes:
        with _s3_errors(key):
            response = self._client.get_object(self.bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    def delete(self, key: str) -> None:
        with _s3_errors(key):
            self._client.remove_object(self.bucket, key)

    def exists(self, key: str) -> bool:
        try:
            with _s3_errors(key):
                self._client.stat_object(self.bucket, key)
        except ObjectMissing:
            return False
        return True

    def modified_times(self, prefix: str = "") -> dict[str, float]:
        """{key: last-modified epoch seconds} of every object under ``prefix``."""
        with _s3_errors(prefix):
            return {obj.object_name: obj.last_modified.timestamp() for obj in
                    self._client.list_objects(self.bucket, prefix=prefix, recursive=True)}

    def keys(self, prefix: str = "") -> list[str]:
        return list(self.modified_times(prefix))

    def presigned_url(self, key: str, ttl_s: int) -> str:
        with _s3_errors(key):
            return self._signer.presigned_get_object(self.bucket, key,
                                                     expires=timedelta(seconds=ttl_s))


class InMemoryObjectStore:
    """The object store's in-memory twin, for worker logic tested without S3. ``down``
    makes every call fail as an unreachable store does, so outages can be played out."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.down = False

    def _reachable(self) -> None:
        if self.down:
            raise ObjectStoreUnavailable("S3 unreachable: down (in-memory twin)")

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._reachable()
        self.objects[key] = bytes(data)

    def get(self, key: str) -> bytes:
        self._reachable()
        if key not in self.objects:
            raise ObjectMissing(f"object {key!r} not found (NoSuchKey)")
        return self.objects[key]

    def delete(self, key: str) -> None:
        self._reachable()
        self.objects.pop(key, None)

    def exists(self, key: str) -> bool:
        self._reachable()
        return key in self.objects
