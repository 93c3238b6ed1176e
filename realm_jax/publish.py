"""Versioned directories published atomically under a prefix: `<prefix>/<version>/...` written
create-only, then `<prefix>/<version>/manifest.json`, then the `<prefix>/LATEST` pointer swapped
by compare-and-swap. A crash at any point leaves LATEST on the previous complete version; a
racing publisher gets `PublishConflict`; readers verify sizes and CRC32C before trusting a file.

Versions are `<step>-<suffix>` strings, e.g. `000000000500-9f1c2a7b` from `new_version(500)`:
ordered by the integer step, then the suffix (so two refreshers on the same checkpoint never
collide). A bare zero-padded integer (`000123`) is also a valid version.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import re
import secrets
from typing import Any, Callable, Mapping, Union

from realm_jax.errors import RealmError
from realm_jax.storage import (
  GenerationMismatch,
  ObjectExists,
  ObjectInfo,
  ObjectNotFound,
  Storage,
  StorageError,
  crc32c_hex,
  file_crc32c,
)

MANIFEST = "manifest.json"
LATEST = "LATEST"
FORMAT = 1
_VERSION_RE = re.compile(r"^(\d+)(?:-([0-9A-Za-z][0-9A-Za-z_]*))?$")

FileSource = Union[bytes, bytearray, memoryview, str, os.PathLike]


class PublishError(RealmError):
  """Base class of publish/read failures."""


class PublishConflict(PublishError):
  """Another publisher got there first (LATEST moved, or the version already exists)."""


class CorruptVersion(PublishError):
  """A published version does not match its manifest; the message names the file."""


@dataclasses.dataclass(frozen=True)
class FileEntry:
  """One published file as recorded in the manifest."""

  size: int
  crc32c: str
  generation: int | None = None  # GCS object generation; reads are pinned to it


@dataclasses.dataclass(frozen=True)
class Manifest:
  """The contents of `<prefix>/<version>/manifest.json`."""

  version: str
  created: str  # ISO-8601 UTC
  metadata: dict[str, Any]
  files: dict[str, FileEntry]

  def to_json(self) -> dict[str, Any]:
    return {"format": FORMAT, "version": self.version, "created": self.created,
            "checksum": "crc32c", "metadata": self.metadata,
            "files": {n: dataclasses.asdict(e) for n, e in sorted(self.files.items())}}

  @classmethod
  def from_json(cls, obj: Any, where: str) -> "Manifest":
    """Parse and validate; a malformed manifest raises CorruptVersion naming `where`."""
    try:
      if obj.get("format") != FORMAT or obj.get("checksum") != "crc32c":
        raise ValueError(f"format {obj.get('format')!r}/{obj.get('checksum')!r}, expected "
                         f"{FORMAT}/'crc32c'")
      files = {}
      for name, e in obj["files"].items():
        gen = e.get("generation")
        if not (isinstance(e["size"], int) and re.fullmatch(r"[0-9a-f]{8}", e["crc32c"])
                and (gen is None or isinstance(gen, int))):
          raise ValueError(f"bad entry for {name!r}: {e!r}")
        files[name] = FileEntry(e["size"], e["crc32c"], gen)
      if not isinstance(obj["metadata"], dict):
        raise ValueError("metadata is not an object")
      return cls(str(obj["version"]), str(obj["created"]), obj["metadata"], files)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      raise CorruptVersion(f"{where}: malformed manifest ({e})") from None


# ---------------------------------------------------------------------------------------------
# Versions
# ---------------------------------------------------------------------------------------------


def new_version(step: int) -> str:
  """A fresh version name for an index built from checkpoint `step`: `<12-digit step>-<8 hex>`."""
  if step < 0:
    raise PublishError(f"step must be >= 0, got {step}")
  return f"{step:012d}-{secrets.token_hex(4)}"


def version_key(version: str) -> tuple[int, str]:
  """Sort key of a version: (step, suffix). Raises PublishError for a malformed name."""
  m = _VERSION_RE.match(version) if isinstance(version, str) else None
  if not m:
    raise PublishError(f"invalid version {version!r}: expected '<step>' or '<step>-<suffix>' "
                       "(digits, then letters/digits/_), e.g. new_version(500)")
  return int(m.group(1)), m.group(2) or ""


def _is_version(name: str) -> bool:
  return bool(_VERSION_RE.match(name))


def _join(*parts: str) -> str:
  return "/".join(p.strip("/") for p in parts if p.strip("/"))


def _read_pointer(storage: Storage, prefix: str) -> tuple[dict[str, Any] | None, int]:
  """(LATEST's JSON, its generation) or (None, 0)."""
  path = _join(prefix, LATEST)
  data, generation = storage.read_with_generation(path)
  if data is None:
    return None, 0
  try:
    pointer = json.loads(data)
    version_key(pointer["version"])
  except (ValueError, KeyError, TypeError, PublishError) as e:
    raise CorruptVersion(f"{storage.uri(path)}: malformed LATEST pointer ({e})") from None
  return pointer, generation


def list_versions(storage: Storage, prefix: str, *, complete_only: bool = True) -> list[str]:
  """Version directories under `prefix`, oldest first; by default only those with a manifest."""
  names = [n for n in storage.listdir(prefix) if _is_version(n)]
  if complete_only:
    names = [n for n in names if storage.stat(_join(prefix, n, MANIFEST)) is not None]
  return sorted(names, key=version_key)


# ---------------------------------------------------------------------------------------------
# Publishing
# ---------------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
  parts = name.split("/") if isinstance(name, str) else [""]
  if name == MANIFEST or any(p in ("", ".", "..") for p in parts) or name.startswith("/"):
    raise PublishError(f"invalid file name {name!r} in a published version (relative POSIX "
                       f"path, not {MANIFEST!r})")


def files_from_dir(local_dir: str | os.PathLike, under: str = "") -> dict[str, pathlib.Path]:
  """`files` for publish() from a local directory (e.g. a serialized ScaNN searcher)."""
  local_dir = pathlib.Path(local_dir)
  return {_join(under, p.relative_to(local_dir).as_posix()): p
          for p in sorted(local_dir.rglob("*")) if p.is_file()}


def _write_file(storage: Storage, path: str, source: FileSource) -> ObjectInfo:
  """Create-only write; an identical existing file (a retried publish) is accepted."""
  try:
    if isinstance(source, (bytes, bytearray, memoryview)):
      return storage.write_bytes(path, bytes(source), exclusive=True)
    return storage.put_file(source, path, exclusive=True)
  except ObjectExists:
    pass
  if isinstance(source, (bytes, bytearray, memoryview)):
    size, crc = len(source), crc32c_hex(source)
  else:
    size, crc = file_crc32c(source)
  info = storage.stat(path)
  existing_crc = info and (info.crc32c or crc32c_hex(storage.read_bytes(path)))
  if info is None or info.size != size or existing_crc != crc:
    raise PublishConflict(f"{storage.uri(path)}: already exists with different content "
                          "(another publisher is using this version name)")
  return ObjectInfo(path, size, info.generation, crc)


def _own_write(storage: Storage, path: str, obj: Any) -> ObjectInfo | None:
  """The object at `path` if it holds exactly the JSON `obj` (a create the client retried after
  the server had made it), else None."""
  data, generation = storage.read_with_generation(path)
  try:
    same = data is not None and json.loads(data) == obj
  except ValueError:
    return None
  return ObjectInfo(path, len(data), generation, crc32c_hex(data)) if same else None


def publish(storage: Storage, prefix: str, version: str, files: Mapping[str, FileSource],
            metadata: Mapping[str, Any] | None = None, *,
            progress: Callable[[str], None] | None = None,
            allow_older: bool = False, one_per_step: bool = False) -> Manifest:
  """Publish `files` (name -> bytes or local file path) as `<prefix>/<version>/` and point
  `<prefix>/LATEST` at it.

  Order: every file create-only, then manifest.json, then LATEST by compare-and-swap against the
  generation read at the start. `progress(step)` is called after each write ("file:<name>",
  "manifest", "latest"). Raises PublishConflict if LATEST moved meanwhile, the version exists, or
  (unless `allow_older`) the version does not sort after the one LATEST names; with
  `one_per_step`, also when LATEST names a version of the same step (another suffix), so that two
  publishers racing on one step leave one version of it.
  Several processes publish one version by splitting it: `begin` (one process), `upload` (each its
  own files), `commit` (one process, with everyone's entries).
  """
  expected = begin(storage, prefix, version, metadata, allow_older=allow_older, one_per_step=one_per_step)
  entries = upload(storage, prefix, version, files, progress=progress)
  return commit(storage, prefix, version, entries, metadata, expected=expected, progress=progress)


def begin(storage: Storage, prefix: str, version: str, metadata: Mapping[str, Any] | None = None, *,
          allow_older: bool = False, one_per_step: bool = False) -> int:
  """Checks that `version` may be published (PublishConflict otherwise; `allow_older` and
  `one_per_step` as in `publish`); returns the generation of LATEST that `commit` will
  compare-and-swap against (so a version of the same step published meanwhile fails the swap)."""
  key = version_key(version)
  try:
    json.dumps(dict(metadata or {}), allow_nan=False)
  except (TypeError, ValueError) as e:
    raise PublishError(f"metadata for {version} is not JSON-serialisable: {e}") from None
  pointer, expected = _read_pointer(storage, prefix)
  if pointer and not allow_older and (key <= version_key(pointer["version"]) or (
      one_per_step and key[0] == version_key(pointer["version"])[0])):
    raise PublishConflict(f"{storage.uri(_join(prefix, LATEST))} already names "
                          f"{pointer['version']}, which is not older than {version}")
  vdir = _join(prefix, version)
  if storage.stat(_join(vdir, MANIFEST)) is not None:
    raise PublishConflict(f"{storage.uri(vdir)}: version already published")
  return expected


def upload(storage: Storage, prefix: str, version: str, files: Mapping[str, FileSource], *,
           progress: Callable[[str], None] | None = None) -> dict[str, FileEntry]:
  """Writes `files` into `<prefix>/<version>/`, create-only; returns their manifest entries."""
  version_key(version)
  names = sorted(files)
  for name in names:
    _check_name(name)
  vdir = _join(prefix, version)
  entries = {}
  for name in names:
    info = _write_file(storage, _join(vdir, name), files[name])
    entries[name] = FileEntry(info.size, info.crc32c, info.generation)
    if progress:
      progress(f"file:{name}")
  return entries


def commit(storage: Storage, prefix: str, version: str, entries: Mapping[str, FileEntry],
           metadata: Mapping[str, Any] | None = None, *, expected: int,
           progress: Callable[[str], None] | None = None) -> Manifest:
  """Writes the version's manifest (create-only) listing `entries`, then swaps LATEST to it if
  LATEST is still at generation `expected` (from `begin`); PublishConflict otherwise."""
  vdir = _join(prefix, version)
  entries = dict(entries)
  created = datetime.datetime.now(datetime.timezone.utc).isoformat()
  manifest = Manifest(version, created, dict(metadata or {}), entries)
  try:
    minfo = storage.write_json(_join(vdir, MANIFEST), manifest.to_json(), exclusive=True)
  except ObjectExists:
    # Ours when the client retried a create whose response was lost (the server wrote it, the
    # connection broke): the same manifest, our `created` time included.
    minfo = _own_write(storage, _join(vdir, MANIFEST), manifest.to_json())
    if minfo is None:
      raise PublishConflict(f"{storage.uri(vdir)}: version was published by someone else "
                            "meanwhile") from None
  if progress:
    progress("manifest")

  latest = {"format": FORMAT, "version": version, "manifest_generation": minfo.generation,
            "published": created}
  try:
    storage.write_json(_join(prefix, LATEST), latest, if_generation_match=expected)
  except (GenerationMismatch, ObjectExists):
    now, _ = _read_pointer(storage, prefix)
    if now == latest:  # our own write, retried after its response was lost: published
      if progress:
        progress("latest")
      return manifest
    # The version is ours and nothing names it: removed, so that a lost race (two publishers of
    # the same step) leaves one version, not a complete one beside it that no LATEST ever named.
    storage.delete(vdir)
    raise PublishConflict(
        f"{storage.uri(_join(prefix, LATEST))} changed while publishing {version} (now names "
        f"{now and now['version']}); {version} was complete but not published, and is removed") from None
  if progress:
    progress("latest")
  return manifest


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _read_manifest(storage: Storage, prefix: str, version: str,
                   generation: int | None = None) -> Manifest:
  path = _join(prefix, version, MANIFEST)
  try:
    data = storage.read_bytes(path, generation=generation)
  except ObjectNotFound as e:
    raise CorruptVersion(f"{storage.uri(path)}: manifest missing ({e})") from None
  try:
    obj = json.loads(data)
  except ValueError as e:
    raise CorruptVersion(f"{storage.uri(path)}: manifest is not JSON ({e})") from None
  manifest = Manifest.from_json(obj, storage.uri(path))
  if manifest.version != version:
    raise CorruptVersion(f"{storage.uri(path)}: names version {manifest.version}, not {version}")
  return manifest


def read_latest(storage: Storage, prefix: str) -> Manifest | None:
  """The manifest LATEST points at (pinned to its generation on GCS), or None if none is
  published. Files are not checked; use open_version for that."""
  pointer, _ = _read_pointer(storage, prefix)
  if pointer is None:
    return None
  return _read_manifest(storage, prefix, pointer["version"], pointer.get("manifest_generation"))


class PublishedVersion:
  """A verified version: reads are pinned to the manifest's generations and checked again."""

  def __init__(self, storage: Storage, prefix: str, manifest: Manifest):
    self.storage, self.prefix, self.manifest = storage, prefix, manifest

  @property
  def version(self) -> str:
    return self.manifest.version

  @property
  def metadata(self) -> dict[str, Any]:
    return self.manifest.metadata

  def path(self, name: str) -> str:
    """Path of a file relative to the storage root."""
    return _join(self.prefix, self.version, name)

  def uri(self, name: str = "") -> str:
    return self.storage.uri(self.path(name))

  def _entry(self, name: str) -> FileEntry:
    try:
      return self.manifest.files[name]
    except KeyError:
      raise PublishError(f"{self.uri(name)}: not part of version {self.version} (files: "
                         f"{', '.join(sorted(self.manifest.files))})") from None

  def _check(self, name: str, size: int, crc: str | None) -> None:
    e = self._entry(name)
    if size != e.size or (crc is not None and crc != e.crc32c):
      raise CorruptVersion(f"{self.uri(name)}: has {size} bytes, crc32c {crc}; manifest says "
                           f"{e.size} bytes, crc32c {e.crc32c}")

  def read_bytes(self, name: str) -> bytes:
    """The file's bytes, verified against the manifest."""
    e = self._entry(name)
    try:
      data = self.storage.read_bytes(self.path(name), generation=e.generation)
    except ObjectNotFound as err:
      raise CorruptVersion(f"{self.uri(name)}: missing ({err})") from None
    self._check(name, len(data), crc32c_hex(data))
    return data

  def read_json(self, name: str) -> Any:
    return json.loads(self.read_bytes(name))

  def read_array(self, name: str):
    import io

    import numpy as np
    return np.load(io.BytesIO(self.read_bytes(name)), allow_pickle=False)

  def download(self, local_dir: str | os.PathLike, under: str = "") -> pathlib.Path:
    """Copy the version's files (or those under `under/`) into `local_dir`, verified; returns
    `local_dir/under` (e.g. a ScaNN directory to load)."""
    local_dir = pathlib.Path(local_dir)
    names = [n for n in self.manifest.files if not under or n.startswith(under.rstrip("/") + "/")]
    if not names:
      raise PublishError(f"{self.uri(under)}: no files under {under!r} in {self.version}")
    for name in names:
      target = local_dir / name
      try:
        self.storage.get_file(self.path(name), target,
                              generation=self.manifest.files[name].generation)
      except ObjectNotFound as err:
        raise CorruptVersion(f"{self.uri(name)}: missing ({err})") from None
      self._check(name, *file_crc32c(target))
    return local_dir / under if under else local_dir

  def verify(self) -> None:
    """Check every file's size and CRC32C: from GCS object metadata at the pinned generation,
    by reading the file elsewhere. Raises CorruptVersion naming the first bad file."""
    for name, e in sorted(self.manifest.files.items()):
      path = self.path(name)
      info = self.storage.stat(path)
      if info is None:
        raise CorruptVersion(f"{self.uri(name)}: missing")
      self._check(name, info.size, None)  # cheap size check first
      if e.generation is not None and info.generation != e.generation:
        raise CorruptVersion(f"{self.uri(name)}: generation {info.generation}, manifest pinned "
                             f"{e.generation} (the object was replaced)")
      local = self.storage.on_disk(path)
      if info.crc32c is not None:  # GCS: the server's checksum of this generation
        self._check(name, info.size, info.crc32c)
      elif local is not None:  # a local root: checksum the file, streamed
        try:
          self._check(name, *file_crc32c(local))
        except FileNotFoundError:
          raise CorruptVersion(f"{self.uri(name)}: missing") from None
      else:
        self.read_bytes(name)


def open_version(storage: Storage, prefix: str, version: str, *,
                 verify: bool = True) -> PublishedVersion:
  """Open a complete version; with `verify`, check every file against the manifest first."""
  version_key(version)
  pv = PublishedVersion(storage, prefix, _read_manifest(storage, prefix, version))
  if verify:
    pv.verify()
  return pv


def open_latest(storage: Storage, prefix: str, *, verify: bool = True,
                attempts: int = 10) -> PublishedVersion | None:
  """open_version of what LATEST names (its manifest pinned), or None if nothing is published.

  If the version turns out missing/corrupt but LATEST has moved on meanwhile (a newer publish
  followed by prune), it retries with the new LATEST (each retry follows a publish, so up to
  `attempts` publishes may overtake one reader); a bad version LATEST still names raises.
  """
  for attempt in range(attempts):
    pointer, _ = _read_pointer(storage, prefix)
    if pointer is None:
      return None
    try:
      pv = PublishedVersion(storage, prefix, _read_manifest(
          storage, prefix, pointer["version"], pointer.get("manifest_generation")))
      if verify:
        pv.verify()
      return pv
    except CorruptVersion:
      now, _ = _read_pointer(storage, prefix)
      if attempt == attempts - 1 or now is None or now["version"] == pointer["version"]:
        raise


# ---------------------------------------------------------------------------------------------
# Retention
# ---------------------------------------------------------------------------------------------


def prune(storage: Storage, prefix: str, keep: int) -> list[str]:
  """Delete old versions: keep the newest `keep` complete versions up to the one LATEST names
  (always kept), delete older ones and crashed (manifest-less) leftovers of older steps than
  LATEST's. Versions newer than LATEST and manifest-less ones of LATEST's own step (a publisher
  that raced LATEST's and is still writing: it removes its version itself when its swap fails)
  are never touched; a leftover that changes while it is deleted (a slow publisher still writing
  it) is left for the next prune. Returns the deleted versions."""
  if keep < 1:
    raise PublishError(f"prune keep must be >= 1, got {keep}")
  pointer, _ = _read_pointer(storage, prefix)
  if pointer is None:
    return []
  latest = pointer["version"]
  lkey = version_key(latest)
  complete = set(list_versions(storage, prefix))
  candidates = [v for v in list_versions(storage, prefix, complete_only=False)
                if version_key(v) <= lkey]
  kept = {latest} | set([v for v in candidates if v in complete][-keep:])
  deleted = []
  for v in candidates:
    if v in kept or (v not in complete and version_key(v)[0] == lkey[0]):
      continue
    if v in complete:  # manifest first: a half-deleted version never looks complete
      storage.delete(_join(prefix, v, MANIFEST))
    try:
      storage.delete(_join(prefix, v))
    except StorageError:
      if v in complete:
        raise
      continue  # files appeared under it while deleting: its publisher is alive; next time
    deleted.append(v)
  return deleted


__all__ = ["CorruptVersion", "FileEntry", "Manifest", "PublishConflict", "PublishError",
           "PublishedVersion", "files_from_dir", "list_versions", "new_version",
           "open_latest", "open_version", "prune", "publish", "read_latest", "version_key"]
