"""The run layout: where each role reads and writes under one storage root (paths relative to it).

  corpus/              the block corpus (`data/corpus.py`); the trainer can read queries from a
                       second corpus under another prefix (`query_corpus_prefix`)
  checkpoints/<step>/  the trainer's (or fine-tuner's) orbax checkpoints; the refresher reads them
  index/<version>/     published index versions (`retrieval/index.py`, through `publish.py`)
  index/LATEST         names the current version; swapped last, by compare-and-swap
  index-work/          embeddings a refresher staged; a restart at the same step resumes them
  metrics/             TensorBoard events and `<name>.jsonl` rows of each run
  TRAINING_DONE        written by the trainer when it finishes; the refresher exits when it appears
  logs/<job>/worker-<W>.log  each TPU worker's log, copied there periodically (`realm-jax ship-log`)
"""

CORPUS = "corpus"
CHECKPOINTS = "checkpoints"
INDEX = "index"
INDEX_WORK = "index-work"
METRICS = "metrics"
TRAINING_DONE = "TRAINING_DONE"
LOGS = "logs"
