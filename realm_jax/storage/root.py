"""A storage root: the one storage API every role uses (`Storage.open(uri)`, relative POSIX paths).

Why it exists: the trainer and the index refresher run as separate processes (often on separate
machines) and share only this root. Every write is atomic (a crash never leaves a half-written file
under its final name), `exclusive=True` never overwrites an existing object, and
`if_generation_match` gives compare-and-swap, which `realm_jax.publish` builds on. What differs
between stores is behind the `Backend` protocol (`backend.py`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import tempfile
from typing import Any

import numpy as np

from realm_jax.storage.backend import Backend, ObjectInfo, ObjectNotFound, StorageError
from realm_jax.storage.local import HIDDEN, LocalBackend


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


def _reason(e: OSError) -> str:
  """An OSError as a user reads it: 'No space left on device', 'Read-only file system', ..."""
  return e.strerror or str(e) or type(e).__name__


@contextlib.contextmanager
def _os_errors(uri: str, what: str):
  """Turns an OSError of the store (full disk, read-only, a file where a directory should be)
  into a StorageError naming `uri`: one line for the user, not a traceback."""
  try:
    yield
  except StorageError:
    raise
  except FileNotFoundError as e:  # still a FileNotFoundError for callers that expect one
    raise ObjectNotFound(f"{uri}: {what} failed: {_reason(e)}") from e
  except OSError as e:
    raise StorageError(f"{uri}: {what} failed: {_reason(e)}") from e


class Storage:
  """A storage root: `Storage.open("gs://bucket/run")`, `Storage.open("/data/run")`, ...

  All paths are relative to the root. Writes are atomic; `exclusive=True` never overwrites.
  """

  def __init__(self, root: str, backend: Backend):
    self.root = root  # normalised URI of the root
    self.backend = backend

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
      from realm_jax.storage.gcs import GcsBackend  # imports gcsfs and google-cloud-storage
      return cls(f"gs://{bucket}" + (f"/{base}" if base else ""), GcsBackend(bucket, base))
    if uri.startswith("memory://"):
      from realm_jax.storage.memory import MemoryBackend
      base = _check_rel(uri[len("memory://"):].strip("/"))
      return cls(f"memory://{base}", MemoryBackend("/" + base))
    if uri.startswith("file://"):
      uri = uri[len("file://"):]
    elif "://" in uri:
      raise StorageError(f"{uri}: unsupported storage URI (use gs://, file://, a local path "
                         "or memory://)")
    root = pathlib.Path(uri).expanduser().absolute()
    existing = next(p for p in (root, *root.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
      raise StorageError(f"{root}: not a directory ({existing} is a file): a storage root must be a directory")
    return cls(str(root), LocalBackend(root))

  def __repr__(self) -> str:
    return f"Storage({self.root!r})"

  # -- addressing -----------------------------------------------------------------------------

  def uri(self, path: str = "") -> str:
    """Absolute URI of `path` for other libraries (orbax, tensorstore): gs://..., /abs/path."""
    return self.backend.uri(_check_rel(path, allow_root=True))

  def on_disk(self, path: str = "") -> pathlib.Path | None:
    """Where `path` is on this machine's disk, or None when the root is an object store (for
    libraries that write or read files themselves, and cheaper checks of local files)."""
    base = self.backend.local_root
    return None if base is None else pathlib.Path(self.uri(path))

  def local_path(self, path: str = "") -> pathlib.Path:
    """The local filesystem path of `path`; only for local roots (StorageError otherwise)."""
    local = self.on_disk(path)
    if local is None:
      raise StorageError(f"{self.root} is not a local directory (stage it with download_dir)")
    return local

  # -- objects --------------------------------------------------------------------------------

  def exists(self, path: str) -> bool:
    """True if `path` is an object (file), or a prefix with objects under it."""
    key = _check_rel(path)
    with _os_errors(self.uri(path), "looking it up"):
      return self.backend.stat(key) is not None or bool(self.backend.ls(key))

  def stat(self, path: str) -> ObjectInfo | None:
    """Size (and on GCS generation + crc32c) of the object at `path`, or None if absent."""
    with _os_errors(self.uri(path), "looking it up"):
      return self.backend.stat(_check_rel(path))

  def read_bytes(self, path: str, *, generation: int | None = None) -> bytes:
    """The object's bytes; with `generation`, exactly that version or ObjectNotFound."""
    with _os_errors(self.uri(path), "reading"):
      return self.backend.read(_check_rel(path), generation)

  def read_range(self, path: str, start: int, length: int, *, generation: int | None = None) -> bytes:
    """`length` bytes of the object from byte `start` (fewer at its end): a process reads only
    its rows of a large file. On GCS `generation` pins the read to that version of the object."""
    if start < 0 or length < 0:
      raise StorageError(f"{self.uri(path)}: bad byte range start={start} length={length}")
    return self.backend.read_range(_check_rel(path), start, length, generation)

  def read_with_generation(self, path: str) -> tuple[bytes | None, int]:
    """(bytes, generation) for a later compare-and-swap; (None, 0) when absent."""
    with _os_errors(self.uri(path), "reading"):
      return self.backend.token(_check_rel(path))

  def write_bytes(self, path: str, data: bytes, *, exclusive: bool = False,
                  if_generation_match: int | None = None) -> ObjectInfo:
    """Write atomically. `exclusive`: raise ObjectExists rather than overwrite.
    `if_generation_match`: write only if the object is still at that generation (0 = absent),
    else GenerationMismatch."""
    with _os_errors(self.uri(path), "writing"):
      return self.backend.write(_check_rel(path), bytes(data), self._precondition(exclusive, if_generation_match))

  def put_file(self, local_file: str | os.PathLike, path: str, *, exclusive: bool = False,
               if_generation_match: int | None = None) -> ObjectInfo:
    """Upload a local file (streamed, not held in memory) with the same guarantees as
    write_bytes."""
    if not os.path.isfile(local_file):
      raise StorageError(f"{local_file}: no such local file to upload to {self.uri(path)}")
    with _os_errors(self.uri(path), "writing"):
      return self.backend.put_file(os.fspath(local_file), _check_rel(path),
                                   self._precondition(exclusive, if_generation_match))

  def get_file(self, path: str, local_file: str | os.PathLike, *,
               generation: int | None = None) -> pathlib.Path:
    """Download one object to a local file (atomically: temp + rename)."""
    local = pathlib.Path(local_file)
    with _os_errors(str(local), f"downloading {self.uri(path)}"):
      local.parent.mkdir(parents=True, exist_ok=True)
      fd, tmp = tempfile.mkstemp(prefix=f"{HIDDEN}tmp-", dir=local.parent)
      os.close(fd)
      try:
        self.backend.get_file(_check_rel(path), tmp, generation)
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
    with _os_errors(self.uri(prefix), "listing"):
      return sorted(self.backend.find(_check_rel(prefix, allow_root=True)))

  def listdir(self, prefix: str = "") -> list[str]:
    """Names of the immediate children (objects and sub-prefixes) of `prefix`, sorted."""
    with _os_errors(self.uri(prefix), "listing"):
      return sorted(set(self.backend.ls(_check_rel(prefix, allow_root=True))))

  def delete(self, path_or_prefix: str) -> int:
    """Delete one object or everything under a prefix; returns how many objects went."""
    with _os_errors(self.uri(path_or_prefix), "deleting"):
      return self.backend.rm(_check_rel(path_or_prefix))

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
