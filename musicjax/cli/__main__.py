"""`python -m musicjax.cli VERB ...`, as the `musicjax` command."""
import sys

from musicjax.cli.app import main

sys.exit(main())
