"""Storage roots for every role: `Storage.open("gs://bucket/run" | "/path" | "file:///path" | "memory://name")`.

`root.py` holds `Storage`, the API; `backend.py` the `Backend` protocol the stores implement:
`local.py` (files), `memory.py` (in-process, tests) and `gcs.py` (GCS or its emulator, and the
gcsfs setting that must precede any import of gcsfs: importing this package applies it).
"""

from realm_jax.storage.backend import (
  Backend,
  GenerationMismatch,
  ObjectExists,
  ObjectInfo,
  ObjectNotFound,
  StorageError,
  crc32c_hex,
  file_crc32c,
)
from realm_jax.storage.gcs import check_emulator_environment, emulator_environment, use_emulator
from realm_jax.storage.root import Storage

__all__ = ["Backend", "GenerationMismatch", "ObjectExists", "ObjectInfo", "ObjectNotFound", "Storage", "StorageError",
           "check_emulator_environment", "crc32c_hex", "emulator_environment", "file_crc32c", "use_emulator"]
