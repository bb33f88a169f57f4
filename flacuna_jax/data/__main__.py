"""``python -m flacuna_jax.data preview|stats|build`` (see ``cli.py``)."""

import sys

from flacuna_jax.data.cli import main

sys.exit(main())
