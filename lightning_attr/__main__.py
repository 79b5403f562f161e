"""``python -m lightning_attr {train,attribute,demo} ...``: see :mod:`lightning_attr.app.cli`."""

import sys

from lightning_attr.app.cli import main

sys.exit(main())
