"""The pipeline's stages: each is `python -m stages.<name>` (what dvc.yaml runs), with the
functions the `datm` CLI calls; stages/common.py has what they share."""

import sys

from datm import interrupts

# `python -m stages.<name>` imports this package while sys.argv[0] is still "-m": the start of
# a stage process (DVC's, or a torchrun rank's). A Ctrl-C during its imports (seconds of torch)
# would abort inside torch's C++ start-up or print a traceback; it is held until the stage's
# work starts (stages.common.guarded), which ends it with exit 130 and one line.
if sys.argv[:1] == ["-m"]:
    interrupts.hold()
