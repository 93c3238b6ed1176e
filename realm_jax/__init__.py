"""realm-jax: REALM retrieval-augmented language model pre-training in JAX/Flax NNX."""

import os as _os

# Where TensorFlow is importable (the `convert` extra), etils would route orbax's gs:// paths
# through tf.io.gfile; keep every environment on the same, tested gcsfs/tensorstore path.
_os.environ.setdefault("EPATH_USE_TF", "false")

__version__ = "0.1.0"
