"""`python -m slmforge.serve` = `slmforge serve`."""

import sys

from slmforge.serve.cli import cli_main

sys.exit(cli_main())
