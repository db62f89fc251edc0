"""`python -m agent` is `scanbox`."""

import sys

from agent.cli import main

sys.exit(main())
