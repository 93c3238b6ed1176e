"""The `gs://` backend, and the environment that points every GCS client at an emulator.

gcsfs (listing cache off, so processes see each other's writes) for reads, listing, deletion
and directory staging; google-cloud-storage for writes and generation-pinned reads, because gcsfs
exposes neither an arbitrary `ifGenerationMatch` nor the written generation. Endpoint from
`STORAGE_EMULATOR_HOST` when set (anonymous credentials), otherwise Application Default
Credentials.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import os
import sys

from realm_jax.storage.backend import (
  GenerationMismatch,
  ObjectExists,
  ObjectInfo,
  ObjectNotFound,
  StorageError,
  crc32c_hex,
  file_crc32c,
)

# Read by gcsfs once, at import: its experimental zonal/HNS probing makes every call against an
# emulator (or a standard bucket) wait ~60 s. Must be set before anything imports gcsfs.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

MULTIPART_MAX = 8 << 20  # google-cloud-storage's single-request (multipart) upload limit
PROBE_TIMEOUT_S = 5.0  # one look at the bucket before any client library starts its minute of retries
_REACHED: set[tuple[str, str]] = set()  # (endpoint, bucket) already reached by this process


def emulator_environment(endpoint: str) -> dict[str, str]:
  """Variables that point gcsfs, google-cloud-storage, tensorstore, array_record and orbax at a
  GCS emulator at `endpoint` (e.g. `http://127.0.0.1:4443`), with no credential probing."""
  endpoint = endpoint.rstrip("/")
  if not endpoint.startswith(("http://", "https://")):
    endpoint = "http://" + endpoint
  return {
      "STORAGE_EMULATOR_HOST": endpoint,  # gcsfs, google-cloud-storage
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # else gcsfs waits 60 s per call
      "TENSORSTORE_GCS_HTTP_URL": endpoint,  # tensorstore (orbax arrays); read once per process
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: skip ADC
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": endpoint,  # array_record / google-cloud-cpp
      "NO_GCE_CHECK": "true",  # google-auth: do not probe the metadata server
      "GCE_METADATA_HOST": "127.0.0.1:1",  # ... and fail at once if something does
      "EPATH_USE_TF": "false",  # etils: route gs:// through gcsfs even where TF is importable
  }


def use_emulator(endpoint: str) -> dict[str, str]:
  """Set `emulator_environment(endpoint)` in `os.environ` (inherited by subprocesses) and check it
  can still take effect in this process. Returns the variables set."""
  env = emulator_environment(endpoint)
  os.environ.update(env)
  check_emulator_environment()
  return env


def check_emulator_environment() -> None:
  """If `STORAGE_EMULATOR_HOST` is set, raise StorageError unless every client will use it."""
  host = os.environ.get("STORAGE_EMULATOR_HOST")
  if not host:
    return
  expected = emulator_environment(host)
  wrong = [k for k, v in expected.items()
           if k not in ("STORAGE_EMULATOR_HOST", "GOOGLE_AUTH_TOKEN_FOR_TESTING")
           and os.environ.get(k) != v]
  if not os.environ.get("GOOGLE_AUTH_TOKEN_FOR_TESTING"):
    wrong.append("GOOGLE_AUTH_TOKEN_FOR_TESTING")
  if wrong:
    raise StorageError(
        f"STORAGE_EMULATOR_HOST={host} is set but these variables do not match it: "
        f"{', '.join(sorted(wrong))}; from Python call realm_jax.storage.use_emulator({host!r}) before "
        "using gs:// so gcsfs, tensorstore and orbax all talk to the emulator (the realm-jax command does "
        "this itself from STORAGE_EMULATOR_HOST)")
  gcsfs = sys.modules.get("gcsfs")
  if gcsfs is not None and gcsfs.GCSFileSystem.__name__ == "ExtendedGcsFileSystem":
    raise StorageError(
        "gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false was set, so every "
        "gs:// call through orbax/etils would stall ~60 s; set the emulator environment before "
        "importing gcsfs (e.g. at the top of conftest.py or the launcher)")



def probe_bucket(bucket: str) -> None:
  """One HTTP request for the bucket's metadata, with a 5 s timeout, before any client library
  (which would retry for a minute, then print a DNS or connection traceback): StorageError naming
  the bucket and the endpoint when it cannot be reached."""
  import urllib.error
  import urllib.parse
  import urllib.request

  emulator = os.environ.get("STORAGE_EMULATOR_HOST")
  endpoint = (emulator or "https://storage.googleapis.com").rstrip("/")
  if not endpoint.startswith(("http://", "https://")):
    endpoint = "http://" + endpoint
  if (endpoint, bucket) in _REACHED:
    return
  url = f"{endpoint}/storage/v1/b/{urllib.parse.quote(bucket, safe='')}?fields=name"
  try:
    with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S):
      pass
  except urllib.error.HTTPError:  # the server answered (401/403 without credentials here, 404 for a
    pass  # bucket not made yet): reachable; what the clients then meet is theirs to report
  except (urllib.error.URLError, OSError) as e:
    reason = getattr(e, "reason", e)
    if emulator:
      raise StorageError(f"gs://{bucket}: cannot reach the GCS emulator at {endpoint} (STORAGE_EMULATOR_HOST) "
                         f"({reason}); is it running on that port?") from None
    raise StorageError(f"gs://{bucket}: cannot reach Google Cloud Storage at {endpoint} ({reason}); check the "
                       "network, or point realm-jax at a GCS emulator with STORAGE_EMULATOR_HOST=http://HOST:PORT")
  _REACHED.add((endpoint, bucket))


class GcsBackend:
  """GCS (or an emulator at STORAGE_EMULATOR_HOST) through gcsfs + google-cloud-storage."""

  local_root = None

  def __init__(self, bucket: str, base: str):
    check_emulator_environment()
    probe_bucket(bucket)
    import gcsfs.core
    self.emulated = bool(os.environ.get("STORAGE_EMULATOR_HOST"))
    # gcsfs.core.GCSFileSystem, not gcsfs.GCSFileSystem: never the experimental subclass.
    self.fs = gcsfs.core.GCSFileSystem(
        token="anon" if self.emulated else None, use_listings_cache=False)
    self.bucket_name, self.base = bucket, base
    self._bucket = None

  @property
  def bucket(self):
    if self._bucket is None:
      from google.cloud import storage as gcs
      try:
        client = gcs.Client()  # anonymous against an emulator, ADC otherwise
      except Exception as e:  # google.auth.exceptions.DefaultCredentialsError and friends
        raise StorageError(f"gs://{self.bucket_name}: no Google Cloud credentials ({e})") from e
      self._bucket = client.bucket(self.bucket_name)
    return self._bucket

  def _k(self, key: str) -> str:
    return f"{self.base}/{key}" if self.base and key else (self.base or key)

  def _p(self, key: str) -> str:
    k = self._k(key)
    return f"{self.bucket_name}/{k}" if k else self.bucket_name

  def uri(self, key: str) -> str:
    return "gs://" + self._p(key)

  def stat(self, key: str) -> ObjectInfo | None:
    try:
      info = self.fs.info(self._p(key))
    except FileNotFoundError:
      return None
    if info.get("type") != "file":
      return None
    crc = info.get("crc32c")
    return ObjectInfo(key, int(info["size"]), int(info["generation"]),
                      base64.b64decode(crc).hex() if crc else None)

  def token(self, key: str) -> tuple[bytes | None, int]:
    from google.api_core import exceptions as gex
    blob = self.bucket.blob(self._k(key))
    try:
      data = blob.download_as_bytes()
    except gex.NotFound:
      return None, 0
    except gex.GoogleAPICallError as e:
      raise StorageError(f"{self.uri(key)}: read failed: {e}") from e
    return data, int(blob.generation)

  def read(self, key: str, generation: int | None) -> bytes:
    if generation is None:
      try:
        return self.fs.cat_file(self._p(key))
      except FileNotFoundError:
        raise ObjectNotFound(f"{self.uri(key)}: no such object") from None
      except OSError as e:
        raise StorageError(f"{self.uri(key)}: read failed: {e}") from e
    from google.api_core import exceptions as gex
    try:
      return self.bucket.blob(self._k(key), generation=generation).download_as_bytes()
    except gex.NotFound:
      raise ObjectNotFound(
          f"{self.uri(key)}: generation {generation} not found (replaced or deleted)") from None
    except gex.GoogleAPICallError as e:
      raise StorageError(f"{self.uri(key)}: read failed: {e}") from e

  def read_range(self, key: str, start: int, length: int, generation: int | None) -> bytes:
    if length <= 0:
      return b""
    from google.api_core import exceptions as gex
    try:
      return self.bucket.blob(self._k(key), generation=generation).download_as_bytes(
          start=start, end=start + length - 1)  # `end` is inclusive
    except gex.NotFound:
      raise ObjectNotFound(f"{self.uri(key)}: no such object" +
                           (f" at generation {generation}" if generation else "")) from None
    except gex.RequestRangeNotSatisfiable:
      return b""  # start at or past the end of the object
    except gex.GoogleAPICallError as e:
      raise StorageError(f"{self.uri(key)}: read failed: {e}") from e

  @contextlib.contextmanager
  def _preconditions(self, key: str, if_generation_match: int | None):
    from google.api_core import exceptions as gex
    try:
      yield
    except gex.PreconditionFailed:
      if if_generation_match == 0:
        raise ObjectExists(f"{self.uri(key)}: already exists (create-only write)") from None
      raise GenerationMismatch(
          f"{self.uri(key)}: changed since generation {if_generation_match} was read") from None
    except gex.GoogleAPICallError as e:
      raise StorageError(f"{self.uri(key)}: write failed: {e}") from e

  def _info(self, key: str, blob) -> ObjectInfo:
    return ObjectInfo(key, int(blob.size), int(blob.generation),
                      base64.b64decode(blob.crc32c).hex() if blob.crc32c else None)

  def _precheck(self, key: str, size: int, if_generation_match: int | None) -> None:
    """Above 8 MiB google-cloud-storage uploads resumably; GCS applies `ifGenerationMatch` there
    too, but fake-gcs-server ignores it. Checking first makes the non-racing case exact on both
    (the race window on the emulator only; small objects such as LATEST are always multipart)."""
    if if_generation_match is None or size <= MULTIPART_MAX:
      return
    info = self.stat(key)
    current = info.generation if info else 0
    with self._preconditions(key, if_generation_match):
      if current != if_generation_match:
        from google.api_core import exceptions as gex
        raise gex.PreconditionFailed(f"generation is {current}")

  def write(self, key: str, data: bytes, if_generation_match: int | None) -> ObjectInfo:
    blob = self.bucket.blob(self._k(key))
    self._precheck(key, len(data), if_generation_match)
    with self._preconditions(key, if_generation_match):
      blob.upload_from_string(bytes(data), content_type="application/octet-stream",
                              if_generation_match=if_generation_match)
    info, crc = self._info(key, blob), crc32c_hex(data)
    if info.crc32c not in (None, crc) or info.size != len(data):
      raise StorageError(f"{self.uri(key)}: server has {info.size} bytes/crc32c {info.crc32c}, "
                         f"uploaded {len(data)} bytes/crc32c {crc}")
    return dataclasses.replace(info, crc32c=crc)

  def put_file(self, local: str, key: str, if_generation_match: int | None) -> ObjectInfo:
    blob = self.bucket.blob(self._k(key))
    self._precheck(key, os.path.getsize(local), if_generation_match)
    with self._preconditions(key, if_generation_match):
      blob.upload_from_filename(local, content_type="application/octet-stream",
                                if_generation_match=if_generation_match)
    info = self._info(key, blob)
    size, crc = file_crc32c(local)
    if info.size != size or info.crc32c not in (None, crc):
      raise StorageError(f"{self.uri(key)}: server has {info.size} bytes/crc32c {info.crc32c}, "
                         f"{local} has {size} bytes/crc32c {crc}")
    return dataclasses.replace(info, crc32c=crc)

  def get_file(self, key: str, local: str, generation: int | None) -> None:
    from google.api_core import exceptions as gex
    try:
      self.bucket.blob(self._k(key), generation=generation).download_to_filename(local)
    except gex.NotFound:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(local)
      what = f"generation {generation}" if generation else "object"
      raise ObjectNotFound(f"{self.uri(key)}: {what} not found") from None

  def _rel(self, path: str) -> str:
    root = self._p("")
    return path[len(root) + 1:] if path != root else ""

  def find(self, key: str) -> list[str]:
    try:
      return [self._rel(p) for p in self.fs.find(self._p(key))]
    except FileNotFoundError:
      return []

  def ls(self, key: str) -> list[str]:
    try:
      names = self.fs.ls(self._p(key), detail=False)
    except FileNotFoundError:
      return []
    own = self._p(key)
    return [n.rstrip("/").rsplit("/", 1)[-1] for n in names if n.rstrip("/") != own]

  def rm(self, key: str) -> int:
    files = self.find(key)
    if files:
      with contextlib.suppress(FileNotFoundError):  # a concurrent delete got there first
        self.fs.rm([self._p(f) for f in files])
      _forget_listings()
    return len(files)


def _forget_listings() -> None:
  """Empties the listing caches of this process's other gcsfs instances (the one etils/orbax uses
  caches listings): else orbax, saving a step whose unfinished directory was just deleted, still
  sees it, tries to remove it and fails with FileNotFoundError (a resume after a kill mid-checkpoint)."""
  import gcsfs.core
  classes = [gcsfs.core.GCSFileSystem, *gcsfs.core.GCSFileSystem.__subclasses__()]
  for cls in classes:
    for instance in list(getattr(cls, "_cache", {}).values()):
      instance.invalidate_cache()

