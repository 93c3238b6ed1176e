"""Output files of the CLI (`evaluate --out`, `finetune --eval-out`): checked before any work, so a
long run never ends on an unwritable path, and never allowed to replace an input or, unless told,
an existing file."""

from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Iterable

from realm_jax.errors import RealmError


class OutputError(RealmError):
  """An output path is unusable: an input, an existing file (without --overwrite), or unwritable."""


def check_output(path: str | os.PathLike, inputs: Iterable[str | os.PathLike], *, overwrite: bool,
                 flag: str) -> pathlib.Path:
  """Refuses `path` if it is one of `inputs`, already exists (unless `overwrite`), is a directory,
  or its directory cannot be created or written (probed with a temporary file). Returns the path."""
  out = pathlib.Path(path).expanduser().absolute()
  for given in inputs:
    src = pathlib.Path(given).expanduser()
    if src.exists() and (out == src.absolute() or (out.exists() and os.path.samefile(out, src))):
      raise OutputError(f"{flag} {out}: is an input of this command ({given}); write the output elsewhere")
  if out.is_dir():
    raise OutputError(f"{flag} {out}: is a directory, expected a file")
  if out.exists() and not overwrite:
    raise OutputError(f"{flag} {out}: already exists; pass --overwrite to replace it, or choose another path")
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.probe-")
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise OutputError(f"{flag} {out}: cannot write there ({e.strerror or e})") from None
  return out
