"""tests/swap: public projects' layers (public_layers.py) and the shared checks (swap_checks.py) importable."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
