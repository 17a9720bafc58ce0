"""``python -m attnfast.kernels.aot``: see ``attnfast.kernels.aot.cli``."""
import sys

from .cli import main

sys.exit(main())
