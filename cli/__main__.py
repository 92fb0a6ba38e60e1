"""`python -m hotpeft.cli` is `hotpeft`."""
import sys

from hotpeft.cli import main

sys.exit(main())
