"""``python -m llama4`` (and ``torchrun ... -m llama4``): the ``llama4`` command."""

import sys

from llama4.cli import main

sys.exit(main())
