"""Kills across both roles, at scale: `python benchmarks/chaos.py --kills N [--steps S] [--seed K] [--gcs]`.

Runs tests/helpers/chaos.py: an uninterrupted trainer + refresher pair, then the same pair on a
fresh local storage root SIGKILLed N times (each kind once first, then drawn at random: the
trainer at a random moment or while orbax writes a checkpoint, the refresher at a random moment
or frozen inside a publish window, both at once), each restarted (the trainer with --resume).
It checks what tests/test_chaos.py checks and prints the counts: kills tried, resumes and whether
each came from the newest finalised checkpoint, failed restarts, torn loads seen, index versions
(all verified), lost steps, and the largest difference of the final parameters from the
uninterrupted run's. With `--gcs` the two roots are in a bucket of a fake-gcs-server started for
the run (the processes reach it through STORAGE_EMULATOR_HOST). Run it from the repository root;
with the defaults (S = 2 N + 4) a kill costs about half a minute on 2 cores (a restart compiles
from the persistent cache).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--kills", type=int, default=30, help="SIGKILLs to try (a publish kill counts two)")
  p.add_argument("--steps", type=int, default=None, help="training steps (default 2 x kills + 4)")
  p.add_argument("--seed", type=int, default=None, help="random seed of the kill schedule (default: the time)")
  p.add_argument("--workdir", default=None, help="where the two storage roots and logs go (default: a temp dir)")
  p.add_argument("--gcs", action="store_true",
                 help="put the two storage roots in a bucket of a fake-gcs-server started for the run "
                      "(as tests/fixtures/gcs.py does); logs stay in the work dir")
  args = p.parse_args(argv)
  if args.kills < 1:
    p.error("--kills must be >= 1")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
  sys.path.insert(0, str(REPO))
  from realm_jax.data.corpus import build_corpus
  from realm_jax.storage import Storage
  from tests.helpers.chaos import chaos
  from tests.helpers.facts_corpus import write_documents

  work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="realm-chaos-"))
  work.mkdir(parents=True, exist_ok=True)
  seed = args.seed if args.seed is not None else int(time.time())
  steps = args.steps or 2 * args.kills + 4
  write_documents(work / "docs.jsonl")
  corpus = Storage.open(str(work / "seed"))
  build_corpus([str(work / "docs.jsonl")], corpus, block_len=64, shard_blocks=4)
  server, roots = None, None
  if args.gcs:  # before anything in this process touches gs:// (tensorstore reads its endpoint once)
    from realm_jax.storage import use_emulator
    from tests.fixtures.gcs import start_gcs_server
    server = start_gcs_server()
    use_emulator(server.endpoint)
    roots = server.new_bucket("chaos")
  print(f"chaos: {args.kills} kills over {steps} steps, seed {seed}, in {roots or work} (logs in {work}); "
        f"load {os.getloadavg()}", flush=True)
  try:
    report = chaos(corpus, work, kills=args.kills, steps=steps, seed=seed, roots=roots)
  finally:
    if server is not None:
      server.process.kill()
      server.process.wait(timeout=10)
  print(report.summary())
  print(f"load average at the end: {os.getloadavg()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
