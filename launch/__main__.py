"""`python -m launch {run,status,cancel,list} GRID [options]`: see launch/cli.py."""

import sys

from scaling_arch import runtime_env

runtime_env.start(reexec=False)  # quiet TensorFlow (gs:// only); stages inherit the log settings
from launch.cli import main  # noqa: E402

sys.exit(main())
