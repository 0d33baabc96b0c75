"""`python -m statecore` runs the statecore command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
