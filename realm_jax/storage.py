"""One storage API for every role: a root URI (`gs://bucket/prefix`, a local path or `file://`,
`memory://name`) and relative POSIX paths under it.

Why it exists: the trainer and the index refresher run as separate processes (often on separate
machines) and share only this root. Every write is atomic (a crash never leaves a half-written file
under its final name), `exclusive=True` never overwrites an existing object, and
`if_generation_match` gives compare-and-swap, which `realm_jax.publish` builds on.

Backends:
- `gs://`: gcsfs (listing cache off, so processes see each other's writes) for reads, listing,
  deletion and directory staging; google-cloud-storage for writes and generation-pinned reads,
  because gcsfs exposes neither an arbitrary `ifGenerationMatch` nor the written generation.
  Endpoint from `STORAGE_EMULATOR_HOST` when set (anonymous credentials), otherwise ADC.
- local: plain files written to a temp file, fsynced, then renamed (or hard-linked for create-only).
- `memory://`: fsspec's in-process store, for unit tests only (not visible to other processes).

Generations: on GCS the object generation; on local/memory roots a 63-bit content token. Either
way 0 means "absent", so `write_bytes(p, b, if_generation_match=read_with_generation(p)[1])` is a
compare-and-swap on every backend.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import pathlib
import shutil
import stat as stat_lib
import sys
import tempfile
import threading
from typing import Any, Iterator

import fsspec
import google_crc32c
import numpy as np

from realm_jax.errors import RealmError

# Read by gcsfs once, at import: its experimental zonal/HNS probing makes every call against an
# emulator (or a standard bucket) wait ~60 s. Must be set before anything imports gcsfs.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

_CHUNK = 8 << 20
_MULTIPART_MAX = 8 << 20  # google-cloud-storage's single-request (multipart) upload limit
_HIDDEN = ".realm-"  # prefix of our temp and lock files in local roots; never listed


class StorageError(RealmError):
  """A storage operation failed; the message names the URI."""


class ObjectNotFound(StorageError, FileNotFoundError):
  """The object does not exist (or not at the requested generation)."""


class ObjectExists(StorageError, FileExistsError):
  """A create-only write found an existing object."""


class GenerationMismatch(StorageError):
  """A compare-and-swap write lost: the object changed since it was read."""


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
  """What a write or stat knows about one object. `generation` is None on local/memory stats."""

  path: str
  size: int
  generation: int | None = None
  crc32c: str | None = None  # 8 lowercase hex digits (big-endian CRC32C), when known


def crc32c_hex(data: bytes | memoryview) -> str:
  """CRC32C of `data` as 8 hex digits (the checksum GCS keeps for every object)."""
  return f"{google_crc32c.value(bytes(data)):08x}"


def file_crc32c(path: str | os.PathLike) -> tuple[int, str]:
  """(size, crc32c hex) of a local file, read in chunks so memory stays bounded."""
  checksum, size = google_crc32c.Checksum(), 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      checksum.update(chunk)
      size += len(chunk)
  return size, checksum.digest().hex()


def _content_token(data: bytes) -> int:
  """Local/memory stand-in for a GCS generation: nonzero, changes whenever the content does."""
  return (int.from_bytes(hashlib.sha256(data).digest()[:8], "big") >> 1) | 1


# ---------------------------------------------------------------------------------------------
# Emulator environment (shared/DESIGN.md §7)
# ---------------------------------------------------------------------------------------------


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
        f"{', '.join(sorted(wrong))}; call realm_jax.storage.use_emulator({host!r}) before "
        "using gs:// so gcsfs, tensorstore and orbax all talk to the emulator")
  gcsfs = sys.modules.get("gcsfs")
  if gcsfs is not None and gcsfs.GCSFileSystem.__name__ == "ExtendedGcsFileSystem":
    raise StorageError(
        "gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false was set, so every "
        "gs:// call through orbax/etils would stall ~60 s; set the emulator environment before "
        "importing gcsfs (e.g. at the top of conftest.py or the launcher)")


# ---------------------------------------------------------------------------------------------
# Backends: the primitive operations, on keys relative to the root
# ---------------------------------------------------------------------------------------------


def _read_umask() -> int:
  umask = os.umask(0o022)
  os.umask(umask)
  return umask


_UMASK = _read_umask()  # read once: os.umask is process-wide and racy between threads


def _tmp_sibling(final: pathlib.Path) -> tuple[int, str]:
  """A temp file in `final`'s directory (same filesystem, so rename/link is atomic)."""
  for attempt in range(3):
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
      fd, tmp = tempfile.mkstemp(prefix=f"{_HIDDEN}tmp-", dir=final.parent)
      break
    except FileNotFoundError:  # a concurrent delete removed the (empty) directory
      if attempt == 2:
        raise
  os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; published files are shared
  return fd, tmp


@contextlib.contextmanager
def _flock(final: pathlib.Path) -> Iterator[None]:
  """Exclusive advisory lock next to `final`; released by the kernel if the process dies."""
  fd = os.open(final.parent / f"{_HIDDEN}lock-{final.name}", os.O_CREAT | os.O_RDWR, 0o666)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)


def _ignore_missing(func, path, exc_info) -> None:
  """shutil.rmtree error handler: files a concurrent delete already removed are fine."""
  if not issubclass(exc_info[0], FileNotFoundError):
    raise exc_info[1]


class _Local:
  """Plain files; atomic via temp file + fsync + rename, create-only via hard link."""

  def __init__(self, root: pathlib.Path):
    self.root = root

  def _p(self, key: str) -> pathlib.Path:
    return self.root / key if key else self.root

  def uri(self, key: str) -> str:
    return str(self._p(key))

  def stat(self, key: str) -> ObjectInfo | None:
    try:
      st = self._p(key).stat()
    except (FileNotFoundError, NotADirectoryError):
      return None
    return ObjectInfo(key, st.st_size) if stat_lib.S_ISREG(st.st_mode) else None

  def read(self, key: str, generation: int | None) -> bytes:
    try:
      data = self._p(key).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
      raise ObjectNotFound(f"{self.uri(key)}: no such file") from None
    if generation is not None and _content_token(data) != generation:
      raise ObjectNotFound(f"{self.uri(key)}: changed since generation {generation} was read")
    return data

  def token(self, key: str) -> tuple[bytes | None, int]:
    try:
      data = self._p(key).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
      return None, 0
    return data, _content_token(data)

  def _commit(self, tmp: str, key: str, if_generation_match: int | None) -> None:
    final = self._p(key)
    if if_generation_match is None:
      os.replace(tmp, final)
    elif if_generation_match == 0:
      try:
        os.link(tmp, final)  # atomic create-only: fails if `final` exists
      except FileExistsError:
        raise ObjectExists(f"{self.uri(key)}: already exists (create-only write)") from None
    else:
      with _flock(final):
        _, current = self.token(key)
        if current != if_generation_match:
          raise GenerationMismatch(
              f"{self.uri(key)}: changed since it was read (generation {if_generation_match}, "
              f"now {current or 'absent'})")
        os.replace(tmp, final)
    with contextlib.suppress(OSError):  # make the rename durable
      dfd = os.open(final.parent, os.O_RDONLY)
      try:
        os.fsync(dfd)
      finally:
        os.close(dfd)

  def _write(self, key: str, fill, if_generation_match: int | None) -> None:
    fd, tmp = _tmp_sibling(self._p(key))
    try:
      with os.fdopen(fd, "wb") as f:
        fill(f)
        f.flush()
        os.fsync(f.fileno())
      self._commit(tmp, key, if_generation_match)
    finally:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)

  def write(self, key: str, data: bytes, if_generation_match: int | None) -> ObjectInfo:
    self._write(key, lambda f: f.write(data), if_generation_match)
    return ObjectInfo(key, len(data), None, crc32c_hex(data))

  def put_file(self, local: str, key: str, if_generation_match: int | None) -> ObjectInfo:
    checksum, size = google_crc32c.Checksum(), [0]

    def fill(f):
      with open(local, "rb") as src:
        while chunk := src.read(_CHUNK):
          checksum.update(chunk)
          size[0] += len(chunk)
          f.write(chunk)

    self._write(key, fill, if_generation_match)
    return ObjectInfo(key, size[0], None, checksum.digest().hex())

  def get_file(self, key: str, local: str, generation: int | None) -> None:
    if generation is not None:
      pathlib.Path(local).write_bytes(self.read(key, generation))
      return
    try:
      with open(self._p(key), "rb") as src, open(local, "wb") as dst:
        while chunk := src.read(_CHUNK):
          dst.write(chunk)
    except (FileNotFoundError, IsADirectoryError):
      raise ObjectNotFound(f"{self.uri(key)}: no such file") from None

  def find(self, key: str) -> list[str]:
    p = self._p(key)
    if p.is_file():
      return [key]
    out = []
    for dirpath, dirnames, filenames in os.walk(p):
      dirnames[:] = [d for d in dirnames if not d.startswith(_HIDDEN)]
      rel = pathlib.Path(dirpath).relative_to(self.root).as_posix()
      out += [f if rel == "." else f"{rel}/{f}" for f in filenames if not f.startswith(_HIDDEN)]
    return out

  @staticmethod
  def _has_files(d: pathlib.Path) -> bool:
    for _, dirnames, filenames in os.walk(d):
      dirnames[:] = [n for n in dirnames if not n.startswith(_HIDDEN)]
      if any(not f.startswith(_HIDDEN) for f in filenames):
        return True
    return False

  def ls(self, key: str) -> list[str]:
    """Like an object store: a directory is listed only if it holds a (visible) file."""
    try:
      children = list(self._p(key).iterdir())
    except (FileNotFoundError, NotADirectoryError):
      return []
    return [c.name for c in children
            if not c.name.startswith(_HIDDEN) and (c.is_file() or self._has_files(c))]

  def rm(self, key: str) -> int:
    p = self._p(key)
    if p.is_file():
      with contextlib.suppress(FileNotFoundError):  # a concurrent delete got there first
        p.unlink()
      n = 1
    else:
      n = len(self.find(key))
      if p.is_dir():
        shutil.rmtree(p, onerror=_ignore_missing)
    parent = p.parent  # drop now-empty parents, as prefixes vanish on object stores
    while parent != self.root and self.root in parent.parents:
      try:
        parent.rmdir()
      except OSError:
        break
      parent = parent.parent
    return n


_MEMORY_LOCK = threading.RLock()


class _Memory:
  """fsspec's in-process memory filesystem; a process-wide lock makes every operation atomic."""

  def __init__(self, base: str):
    self.fs = fsspec.filesystem("memory")
    self.base = base  # "/name/prefix"

  def _p(self, key: str) -> str:
    return f"{self.base}/{key}" if key else self.base

  def uri(self, key: str) -> str:
    return "memory:/" + self._p(key)

  def stat(self, key: str) -> ObjectInfo | None:
    p = self._p(key)
    with _MEMORY_LOCK:
      return ObjectInfo(key, self.fs.size(p)) if self.fs.isfile(p) else None

  def token(self, key: str) -> tuple[bytes | None, int]:
    p = self._p(key)
    with _MEMORY_LOCK:
      if not self.fs.isfile(p):
        return None, 0
      data = self.fs.cat_file(p)
    return data, _content_token(data)

  def read(self, key: str, generation: int | None) -> bytes:
    data, token = self.token(key)
    if data is None:
      raise ObjectNotFound(f"{self.uri(key)}: no such object")
    if generation is not None and token != generation:
      raise ObjectNotFound(f"{self.uri(key)}: changed since generation {generation} was read")
    return data

  def write(self, key: str, data: bytes, if_generation_match: int | None) -> ObjectInfo:
    with _MEMORY_LOCK:
      if if_generation_match is not None:
        _, current = self.token(key)
        if if_generation_match == 0 and current:
          raise ObjectExists(f"{self.uri(key)}: already exists (create-only write)")
        if current != if_generation_match:
          raise GenerationMismatch(f"{self.uri(key)}: changed since it was read")
      self.fs.pipe_file(self._p(key), bytes(data))
    return ObjectInfo(key, len(data), None, crc32c_hex(data))

  def put_file(self, local: str, key: str, if_generation_match: int | None) -> ObjectInfo:
    return self.write(key, pathlib.Path(local).read_bytes(), if_generation_match)

  def get_file(self, key: str, local: str, generation: int | None) -> None:
    pathlib.Path(local).write_bytes(self.read(key, generation))

  def _rel(self, path: str) -> str:
    return path[len(self.base) + 1:]

  def find(self, key: str) -> list[str]:
    with _MEMORY_LOCK:
      return [self._rel(p) for p in self.fs.find(self._p(key))]

  def ls(self, key: str) -> list[str]:
    p = self._p(key)
    with _MEMORY_LOCK:
      if not self.fs.isdir(p):
        return []
      return [n.rstrip("/").rsplit("/", 1)[-1] for n in self.fs.ls(p, detail=False)]

  def rm(self, key: str) -> int:
    with _MEMORY_LOCK:
      files = self.find(key)
      for f in files:
        self.fs.rm_file(self._p(f))
    return len(files)


class _Gcs:
  """GCS (or an emulator at STORAGE_EMULATOR_HOST) through gcsfs + google-cloud-storage."""

  def __init__(self, bucket: str, base: str):
    check_emulator_environment()
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
    if if_generation_match is None or size <= _MULTIPART_MAX:
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
    return len(files)


# ---------------------------------------------------------------------------------------------
# The public API
# ---------------------------------------------------------------------------------------------


def _check_rel(path: str, *, allow_root: bool = False) -> str:
  """Validate a relative POSIX path inside the root (no '..', no leading '/')."""
  if not isinstance(path, str):
    raise StorageError(f"storage path must be a str, got {type(path).__name__}")
  p = path.strip("/") if path in ("", "/") else path
  parts = p.split("/") if p else []
  if (path.startswith("/") or any(s in ("", ".", "..") for s in parts) or "\\" in path
      or (not parts and not allow_root)):
    raise StorageError(f"invalid storage path {path!r}: expected a relative POSIX path like "
                       "'index/000001/emb.npy' (no leading '/', '.', '..' or empty parts)")
  return p


class Storage:
  """A storage root: `Storage.open("gs://bucket/run")`, `Storage.open("/data/run")`, ...

  All paths are relative to the root. Writes are atomic; `exclusive=True` never overwrites.
  """

  def __init__(self, root: str, kind: str, backend: Any):
    self.root = root  # normalised URI of the root
    self.kind = kind  # "gcs" | "local" | "memory"
    self._b = backend

  @classmethod
  def open(cls, uri: str | os.PathLike) -> "Storage":
    """Open a root: `gs://bucket[/prefix]`, `file:///abs/path`, a local path, `memory://name`."""
    uri = os.fspath(uri)
    if uri.startswith(("gs://", "gcs://")):
      rest = uri.split("://", 1)[1].strip("/")
      bucket, _, base = rest.partition("/")
      if not bucket:
        raise StorageError(f"{uri}: a gs:// root needs a bucket name")
      base = _check_rel(base, allow_root=True)
      return cls(f"gs://{bucket}" + (f"/{base}" if base else ""), "gcs", _Gcs(bucket, base))
    if uri.startswith("memory://"):
      base = _check_rel(uri[len("memory://"):].strip("/"))
      return cls(f"memory://{base}", "memory", _Memory("/" + base))
    if uri.startswith("file://"):
      uri = uri[len("file://"):]
    elif "://" in uri:
      raise StorageError(f"{uri}: unsupported storage URI (use gs://, file://, a local path "
                         "or memory://)")
    root = pathlib.Path(uri).expanduser().absolute()
    return cls(str(root), "local", _Local(root))

  def __repr__(self) -> str:
    return f"Storage({self.root!r})"

  # -- addressing -----------------------------------------------------------------------------

  def uri(self, path: str = "") -> str:
    """Absolute URI of `path` for other libraries (orbax, tensorstore): gs://..., /abs/path."""
    return self._b.uri(_check_rel(path, allow_root=True))

  def local_path(self, path: str = "") -> pathlib.Path:
    """The local filesystem path of `path`; only for local roots."""
    if self.kind != "local":
      raise StorageError(f"{self.root} is not a local directory (stage it with download_dir)")
    return pathlib.Path(self.uri(path))

  # -- objects --------------------------------------------------------------------------------

  def exists(self, path: str) -> bool:
    """True if `path` is an object (file), or a prefix with objects under it."""
    key = _check_rel(path)
    return self._b.stat(key) is not None or bool(self._b.ls(key))

  def stat(self, path: str) -> ObjectInfo | None:
    """Size (and on GCS generation + crc32c) of the object at `path`, or None if absent."""
    return self._b.stat(_check_rel(path))

  def read_bytes(self, path: str, *, generation: int | None = None) -> bytes:
    """The object's bytes; with `generation`, exactly that version or ObjectNotFound."""
    return self._b.read(_check_rel(path), generation)

  def read_with_generation(self, path: str) -> tuple[bytes | None, int]:
    """(bytes, generation) for a later compare-and-swap; (None, 0) when absent."""
    return self._b.token(_check_rel(path))

  def write_bytes(self, path: str, data: bytes, *, exclusive: bool = False,
                  if_generation_match: int | None = None) -> ObjectInfo:
    """Write atomically. `exclusive`: raise ObjectExists rather than overwrite.
    `if_generation_match`: write only if the object is still at that generation (0 = absent),
    else GenerationMismatch."""
    return self._b.write(_check_rel(path), bytes(data),
                         self._precondition(exclusive, if_generation_match))

  def put_file(self, local_file: str | os.PathLike, path: str, *, exclusive: bool = False,
               if_generation_match: int | None = None) -> ObjectInfo:
    """Upload a local file (streamed, not held in memory) with the same guarantees as
    write_bytes."""
    if not os.path.isfile(local_file):
      raise StorageError(f"{local_file}: no such local file to upload to {self.uri(path)}")
    return self._b.put_file(os.fspath(local_file), _check_rel(path),
                            self._precondition(exclusive, if_generation_match))

  def get_file(self, path: str, local_file: str | os.PathLike, *,
               generation: int | None = None) -> pathlib.Path:
    """Download one object to a local file (atomically: temp + rename)."""
    local = pathlib.Path(local_file)
    local.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{_HIDDEN}tmp-", dir=local.parent)
    os.close(fd)
    try:
      self._b.get_file(_check_rel(path), tmp, generation)
      os.replace(tmp, local)
    finally:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    return local

  @staticmethod
  def _precondition(exclusive: bool, if_generation_match: int | None) -> int | None:
    if exclusive and if_generation_match not in (None, 0):
      raise StorageError("exclusive=True and if_generation_match != 0 contradict each other")
    return 0 if exclusive else if_generation_match

  def read_json(self, path: str) -> Any:
    """Parse a JSON object; malformed JSON raises StorageError naming the file and position."""
    data = self.read_bytes(path)
    try:
      return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise StorageError(f"{self.uri(path)}: not valid JSON: {e}") from None

  def write_json(self, path: str, obj: Any, *, exclusive: bool = False,
                 if_generation_match: int | None = None) -> ObjectInfo:
    """Write strict JSON (sorted keys, no NaN) atomically."""
    try:
      text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
      raise StorageError(f"{self.uri(path)}: value is not JSON-serialisable: {e}") from None
    return self.write_bytes(path, (text + "\n").encode(), exclusive=exclusive,
                            if_generation_match=if_generation_match)

  def read_array(self, path: str, *, dtype: Any = None) -> np.ndarray:
    """Load a `.npy` array (never pickle). `.npy` stores ml_dtypes types such as bfloat16 as raw
    void (`|V2`); pass `dtype=ml_dtypes.bfloat16` to view them back."""
    data = self.read_bytes(path)
    try:
      array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
      raise StorageError(f"{self.uri(path)}: not a valid .npy array: {e}") from None
    if dtype is not None and array.dtype != np.dtype(dtype):
      if array.dtype.kind != "V" or array.dtype.itemsize != np.dtype(dtype).itemsize:
        raise StorageError(f"{self.uri(path)}: stored dtype {array.dtype} is not {np.dtype(dtype)}")
      array = array.view(dtype)
    return array

  def write_array(self, path: str, array: np.ndarray, *, exclusive: bool = False) -> ObjectInfo:
    """Save a numeric array as `.npy` (object arrays are refused: they would need pickle)."""
    buf = io.BytesIO()
    try:
      np.save(buf, np.asarray(array), allow_pickle=False)
    except ValueError as e:
      raise StorageError(f"{self.uri(path)}: cannot save array without pickle: {e}") from None
    return self.write_bytes(path, buf.getvalue(), exclusive=exclusive)

  # -- trees ----------------------------------------------------------------------------------

  def list(self, prefix: str = "") -> list[str]:
    """Every object under `prefix` (a directory-like path, or "" for the root), sorted, as paths
    relative to the root."""
    return sorted(self._b.find(_check_rel(prefix, allow_root=True)))

  def listdir(self, prefix: str = "") -> list[str]:
    """Names of the immediate children (objects and sub-prefixes) of `prefix`, sorted."""
    return sorted(set(self._b.ls(_check_rel(prefix, allow_root=True))))

  def delete(self, path_or_prefix: str) -> int:
    """Delete one object or everything under a prefix; returns how many objects went."""
    return self._b.rm(_check_rel(path_or_prefix))

  def upload_dir(self, local_dir: str | os.PathLike, prefix: str, *,
                 exclusive: bool = False) -> dict[str, ObjectInfo]:
    """Copy every file under `local_dir` to `prefix/<relative path>`; returns infos by
    relative path."""
    local_dir = pathlib.Path(local_dir)
    if not local_dir.is_dir():
      raise StorageError(f"{local_dir}: not a directory")
    prefix = _check_rel(prefix, allow_root=True)
    out = {}
    for f in sorted(p for p in local_dir.rglob("*") if p.is_file()):
      rel = f.relative_to(local_dir).as_posix()
      out[rel] = self.put_file(f, f"{prefix}/{rel}" if prefix else rel, exclusive=exclusive)
    return out

  def download_dir(self, prefix: str, local_dir: str | os.PathLike) -> pathlib.Path:
    """Copy every object under `prefix` into `local_dir` (for libraries that only read local
    directories, e.g. ScaNN)."""
    prefix = _check_rel(prefix, allow_root=True)
    local_dir = pathlib.Path(local_dir)
    files = self.list(prefix)
    if not files:
      raise ObjectNotFound(f"{self.uri(prefix)}: no objects under this prefix")
    for f in files:
      self.get_file(f, local_dir / (f[len(prefix) + 1:] if prefix else f))
    return local_dir
