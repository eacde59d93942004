"""``qkv`` in this process, killed with SIGKILL at one fault point of the training loop.

Run from the repository root as ``python -m tests.train.killer POINT:STEP ARGS...``:
``checkpoint:20`` dies halfway through writing the checkpoint of step 20, ``step:33`` right
after step 33 was logged; ARGS are those of ``python -m qkv``. The hook is the loop's
test-only ``qkv.train.checkpoint._fault_hook``; nothing in qkv reads the environment for it.
"""

from __future__ import annotations

import os
import signal
import sys

from qkv.cli.main import main
from qkv.train import checkpoint


def install(at: str) -> None:
    """SIGKILL this process when the loop reaches fault point ``at`` ("checkpoint:20")."""

    def hook(point: str, step: int) -> None:
        if f"{point}:{step}" == at:
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint._fault_hook = hook


if __name__ == "__main__":
    install(sys.argv[1])
    raise SystemExit(main(sys.argv[2:]))
