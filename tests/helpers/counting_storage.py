"""A storage backend wrapper that counts the bytes of every object read through it (whole reads and
byte ranges): what the multi-process tests and `benchmarks/scale.py` use to show which rows a
process reads."""


class Counting:
  """Delegates to `inner` (a real `Backend`); `read_bytes[key]` sums the bytes read of each object."""

  def __init__(self, inner):
    self.inner, self.read_bytes = inner, {}

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def _count(self, key, data):
    self.read_bytes[key] = self.read_bytes.get(key, 0) + len(data)
    return data

  def read(self, key, generation):
    return self._count(key, self.inner.read(key, generation))

  def read_range(self, key, start, length, generation):
    return self._count(key, self.inner.read_range(key, start, length, generation))
