"""Train uniref models: ``deepspeed training/run.py --config training/configs/NAME.yaml [--resume auto]``.

Runs under ``deepspeed``, ``torchrun`` or plain ``python`` (one process); see training/README.md.
"""

import sys

from uniref.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
