"""``python -m kdkit`` (what torchrun runs: ``torchrun --nproc-per-node N -m kdkit ...``)."""

import sys

from kdkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
