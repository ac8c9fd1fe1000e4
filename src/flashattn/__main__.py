"""`python -m flashattn ...` is the `flashattn` command."""
import sys

from .cli import main

sys.exit(main())
