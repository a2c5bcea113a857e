"""``python -m cifarnet.study {train,eval} ...`` is ``cifarnet-train`` / ``cifarnet-eval``, for
launchers that start a module rather than a command (``torchrun -m cifarnet.study train ...``)."""

import sys

from cifarnet.study.cli import main

sys.exit(main())
