"""`python -m realm_jax ...` is the `realm-jax` command."""

import sys

from realm_jax.cli.main import main

sys.exit(main())
