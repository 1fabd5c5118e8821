"""`python -m distcnn.data`: see distcnn.data.cli."""

import sys

from distcnn.data.cli import main
from distcnn.errors import run_cli

sys.exit(run_cli(main))
