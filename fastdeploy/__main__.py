"""`python -m fastdeploy` is the same as the `fastdeploy` command."""

import sys

from fastdeploy.cli import main

if __name__ == "__main__":
    sys.exit(main())
