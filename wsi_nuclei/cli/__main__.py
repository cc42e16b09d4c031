"""``python -m wsi_nuclei.cli``: the same as the ``wsi-nuclei`` command."""

import sys

from ._main import main

sys.exit(main())
