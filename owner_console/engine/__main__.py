"""``python -m owner_console.engine FORMAT SOURCE DESTINATION``: write a dataset's shared copy, then exit.

Run by :func:`owner_console.engine.cache.copy_main`'s caller for large files,
so that the memory the conversion used is returned when the process ends.
"""
import sys

from owner_console.engine.cache import copy_main

sys.exit(copy_main(sys.argv[1:]))
