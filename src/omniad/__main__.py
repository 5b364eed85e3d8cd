"""``python -m omniad`` (and ``torchrun --nproc-per-node N -m omniad fit ...``): the command line."""

import sys

from omniad.cli import main

sys.exit(main())
