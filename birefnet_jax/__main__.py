"""`python -m birefnet_jax` runs the `birefnet-jax` command."""

import sys

from birefnet_jax.cli import main

sys.exit(main())
