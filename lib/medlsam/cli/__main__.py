"""`python -m medlsam.cli ...` (what torchrun and --workers launch)."""

import sys

from medlsam.cli import main

if __name__ == "__main__":
    sys.exit(main())
