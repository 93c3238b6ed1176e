"""TPU slice shapes a config can declare (`TrainConfig.target_slice`): devices, hosts, HBM per device.

Names as gcloud spells them (`v4-32`, `v5litepod-64`, also written `v5e-64`, `v5p-16`, `v6e-8`).
The size in a v4 / v5p name counts TensorCores (two per chip, run as one "megacore" JAX device);
in a v5e / v6e name it counts chips. Multi-host slices have 4 chips per VM; a single VM holds up to
4 chips (v4, v5p) or 8 (v5e, v6e). HBM per chip: v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB
(cloud.google.com/tpu/docs/system-architecture-tpu-vm). `tpu/_kit.py` keeps the same table (with
runtime versions) for the launch kit, which must run without realm-jax installed; a test checks
that the two agree. Standard library only.
"""

from __future__ import annotations

import dataclasses

from realm_jax.errors import ConfigError

GIB = 1024 ** 3
# family: (TensorCores per chip, HBM bytes per chip, sizes in the type name)
_FAMILIES = {
    "v4": (2, 32 * GIB, (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)),
    "v5litepod": (1, 16 * GIB, (1, 4, 8, 16, 32, 64, 128, 256)),
    "v5p": (2, 95 * GIB, (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 12288)),
    "v6e": (1, 32 * GIB, (1, 4, 8, 16, 32, 64, 128, 256)),
}
_ALIASES = {"v5e": "v5litepod"}


@dataclasses.dataclass(frozen=True)
class Slice:
  """One slice shape: JAX devices (= chips), hosts (= JAX processes, one per VM), HBM per device."""

  name: str
  devices: int
  hosts: int
  hbm_bytes: int


def _table() -> dict[str, Slice]:
  out = {}
  for family, (cores, hbm, sizes) in _FAMILIES.items():
    for size in sizes:
      chips = size // cores
      hosts = 1 if chips <= (4 if cores == 2 else 8) else chips // 4
      out[f"{family}-{size}"] = Slice(f"{family}-{size}", chips, hosts, hbm)
  return out


SLICES = _table()


def canonical(name: str) -> str:
  """`v5e-64` -> `v5litepod-64`; other names unchanged (lower-cased)."""
  family, _, size = name.strip().lower().partition("-")
  return f"{_ALIASES.get(family, family)}-{size}"


def get_slice(name: str) -> Slice:
  """The slice called `name`; an unknown name is a ConfigError listing the known families."""
  key = canonical(name)
  if key not in SLICES:
    raise ConfigError(f"unknown target_slice {name!r}: expected a TPU type such as v4-32, v5litepod-64 "
                      f"(v5e-64), v5p-16 or v6e-8 (families {', '.join(list(_FAMILIES) + list(_ALIASES))})")
  return SLICES[key]
