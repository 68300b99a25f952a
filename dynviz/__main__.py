"""``python -m dynviz``: the command line of ``dynviz.cli``."""
import sys

from dynviz.cli import main

if __name__ == "__main__":
    sys.exit(main())
