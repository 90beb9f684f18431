"""`python -m flexpipe.runtime.daemon router|worker ...`."""

import sys

from flexpipe.runtime.daemon.cli import main

if __name__ == "__main__":
    sys.exit(main())
