"""``python -m reparam``: the same as the ``reparam`` command."""
import sys

from .cli import main

sys.exit(main())
