"""`python -m difftrain ...` (also what `accelerate launch -m difftrain` and `torchrun -m` run)."""

import sys

from difftrain.cli.main import main

sys.exit(main())
