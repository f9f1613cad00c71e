"""``python -m owner_console`` is ``bastion-owner``."""
import sys

from owner_console.cli import main

sys.exit(main())
