"""`python -m monosem VERB ...` is the same as the `monosem` command."""
import sys

from monosem.cli import main

sys.exit(main())
