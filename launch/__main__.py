"""`python -m launch {run,status,cancel,list} GRID [options]`: see launch/cli.py."""

import sys

from launch.cli import main

sys.exit(main())
