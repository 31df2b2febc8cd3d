"""The `datm` command (cli/main.py)."""

import sys
from pathlib import Path

from datm import interrupts

# The `datm` command imports torch before it parses its arguments (seconds). A Ctrl-C during
# that would abort inside torch's C++ start-up or print a traceback; it is held until a command
# starts (cli.main._started), which ends it with exit 130 and one line.
if Path(sys.argv[0]).name == "datm":
    interrupts.hold()
