"""`python -m molmo_core.eval ...`: the same as `python launch.py --eval ...`."""
import sys

from .cli import main

sys.exit(main())
