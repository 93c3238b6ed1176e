"""Checksum manifests of orbax checkpoints: written inside each step's directory after orbax has
written every file and before it commits the step, verified before anything is restored.

Orbax commits a step by renaming `<step>.orbax-checkpoint-tmp-*` to `<step>` (local files) or by
writing `<step>/commit_success.txt` (GCS). Its temporary-path class runs that commit; ours
(`sealing_path_class`) first lists every file of the step, records its size and CRC32C (on GCS
the server's checksum and the object's generation) in `<step>/realm_manifest.json`, then lets
orbax commit. So a committed step always carries its manifest: there is no moment in which a
step is visible but unsealed, and a kill at any point leaves either an uncommitted leftover or a
complete, sealed step. `verify` checks the files a restore is about to read against it and raises
`CorruptCheckpoint` naming the first bad file.

Not covered (orbax rewrites or writes them at the commit itself): `_CHECKPOINT_METADATA` (commit
time, not read to restore arrays) and `commit_success.txt`.
"""

from __future__ import annotations

import asyncio
import datetime
import re
from typing import Iterable

from orbax.checkpoint.path import atomicity, atomicity_defaults

from realm_jax.errors import RealmError
from realm_jax.storage import ObjectNotFound, Storage, StorageError, file_crc32c

MANIFEST = "realm_manifest.json"
FORMAT = 1
UNSEALED = ("_CHECKPOINT_METADATA", atomicity.COMMIT_SUCCESS_FILE, MANIFEST)
TMP_SUFFIX = ".orbax-checkpoint-tmp"
_STEP_RE = re.compile(r"^(\d+)(\.orbax-checkpoint-tmp.*)?$")


class CheckpointError(RealmError):
  """Checkpoints are missing, damaged, or do not fit the run being resumed."""


class CorruptCheckpoint(CheckpointError):
  """A checkpoint's files do not match its manifest (or it has none); the message names the file."""


def seal(storage: Storage, name: str, step: int) -> dict:
  """Lists every file under `name/` (a step's directory, temporary or final, relative to the
  checkpoints root `storage`) and writes `name/realm_manifest.json`; returns the manifest."""
  files = {}
  for path in storage.list(name):
    rel = path[len(name) + 1:]
    if rel in UNSEALED:
      continue
    info = storage.stat(path)
    if info is None:
      raise CheckpointError(f"{storage.uri(path)}: vanished while the checkpoint was being sealed")
    crc, generation = info.crc32c, info.generation
    if crc is None:
      local = storage.on_disk(path)
      crc = file_crc32c(local)[1] if local is not None else None
      if crc is None:
        from realm_jax.storage import crc32c_hex
        crc = crc32c_hex(storage.read_bytes(path))
    files[rel] = {"size": info.size, "crc32c": crc, "generation": generation}
  manifest = {"format": FORMAT, "checksum": "crc32c", "step": step, "files": files,
              "sealed": datetime.datetime.now(datetime.timezone.utc).isoformat()}
  storage.write_json(f"{name}/{MANIFEST}", manifest)
  return manifest


def _sealing(base: type) -> type:
  class Sealing(base):
    """Orbax's temporary path, sealing the step with a manifest before orbax commits it."""

    async def finalize(self):
      tmp, final = self.get(), self.get_final()
      if final.name.isdigit():  # the step itself (orbax also commits each item's directory this way)
        storage = Storage.open(str(tmp.parent))
        await asyncio.to_thread(seal, storage, tmp.name, int(final.name))
      await super().finalize()

    @classmethod
    async def validate_final(cls, final_path):
      # A step counts as committed only with orbax's commit marker, on local files too (orbax
      # writes it before its rename): a step directory without one is a leftover, not a step.
      if not await asyncio.to_thread((final_path / atomicity.COMMIT_SUCCESS_FILE).exists):
        raise atomicity.ValidationError(f"{final_path} has no {atomicity.COMMIT_SUCCESS_FILE}")
      await super().validate_final(final_path)

  Sealing.__name__ = Sealing.__qualname__ = f"Sealing{base.__name__}"
  return Sealing


SealingAtomicRename = _sealing(atomicity.AtomicRenameTemporaryPath)
SealingCommitFile = _sealing(atomicity.CommitFileTemporaryPath)


def sealing_path_class(directory: str) -> type:
  """The temporary-path class orbax would use for `directory` (rename on local files, a commit file
  on GCS), sealing each step before its commit."""
  from etils import epath

  base = atomicity_defaults.get_default_temporary_path_class(epath.Path(directory))
  return SealingCommitFile if issubclass(base, atomicity.CommitFileTemporaryPath) else SealingAtomicRename


def step_entries(storage: Storage) -> dict[str, int]:
  """Names under the checkpoints root that belong to a step (`6`, `6.orbax-checkpoint-tmp-...`)."""
  out = {}
  for name in storage.listdir(""):
    m = _STEP_RE.match(name)
    if m:
      out[name] = int(m.group(1))
  return out


def read_manifest(storage: Storage, step: int) -> dict:
  """The manifest of finalised step `step`; CorruptCheckpoint when it is missing or malformed."""
  path = f"{step}/{MANIFEST}"
  try:
    manifest = storage.read_json(path)
  except ObjectNotFound:
    raise CorruptCheckpoint(
        f"{storage.uri(str(step))}: no {MANIFEST}, so the checkpoint cannot be verified (written by a "
        "realm-jax older than checksummed checkpoints, or the manifest was deleted)") from None
  except StorageError as e:
    raise CorruptCheckpoint(f"{storage.uri(path)}: unreadable manifest ({e})") from None
  ok = (isinstance(manifest, dict) and manifest.get("format") == FORMAT and manifest.get("step") == step
        and isinstance(manifest.get("files"), dict))
  if not ok:
    raise CorruptCheckpoint(f"{storage.uri(path)}: malformed checkpoint manifest")
  return manifest


def verify(storage: Storage, step: int, items: Iterable[str] | None = None) -> None:
  """Checks the files of step `step` (those of `items` only, when given: `retriever`, `meta`, ...)
  against its manifest: present, same size, same CRC32C (on GCS: same generation). Raises
  CorruptCheckpoint naming the first bad file."""
  manifest = read_manifest(storage, step)
  where = storage.uri(f"{step}/{MANIFEST}")
  wanted = None if items is None else set(items)
  files = manifest["files"]
  if wanted is not None:
    present = {rel.split("/", 1)[0] for rel in files}
    missing = sorted(wanted - present)
    if missing:
      raise CorruptCheckpoint(f"{storage.uri(str(step))}: has no {', '.join(missing)} (the manifest lists "
                              f"{', '.join(sorted(present))})")
  for rel, entry in sorted(files.items()):
    if wanted is not None and rel.split("/", 1)[0] not in wanted:
      continue
    path = f"{step}/{rel}"
    info = storage.stat(path)
    if info is None:
      raise CorruptCheckpoint(f"{storage.uri(path)}: missing (listed in {where})")
    if info.generation is not None and entry.get("generation") not in (None, info.generation):
      raise CorruptCheckpoint(f"{storage.uri(path)}: replaced since the checkpoint was written (generation "
                              f"{info.generation}, {where} says {entry['generation']})")
    crc = info.crc32c
    if crc is None and info.size == entry["size"]:
      local = storage.on_disk(path)
      try:
        crc = file_crc32c(local)[1] if local is not None else None
      except FileNotFoundError:
        raise CorruptCheckpoint(f"{storage.uri(path)}: missing (listed in {where})") from None
      if crc is None:
        from realm_jax.storage import crc32c_hex
        crc = crc32c_hex(storage.read_bytes(path))
    if info.size != entry["size"] or crc != entry["crc32c"]:
      raise CorruptCheckpoint(f"{storage.uri(path)}: damaged ({info.size} bytes, crc32c {crc}; {where} says "
                              f"{entry['size']} bytes, crc32c {entry['crc32c']})")


__all__ = ["CheckpointError", "CorruptCheckpoint", "MANIFEST", "read_manifest", "seal", "sealing_path_class",
           "step_entries", "verify"]
