"""`python -m compressor ...` is the `compressor` command."""

import sys

from compressor.cli import main

sys.exit(main())
