"""`python -m slmforge.serve` = `slmforge serve`."""

import sys

from slmforge.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
