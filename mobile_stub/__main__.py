"""`python -m mobile_stub ...`; the commands live in `mobile_stub.cli`."""

import sys

from mobile_stub.cli import main

if __name__ == "__main__":
    sys.exit(main())
