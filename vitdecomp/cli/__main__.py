"""``python -m vitdecomp.cli`` = the ``vitdecomp`` command."""
import sys

from . import main

sys.exit(main())
