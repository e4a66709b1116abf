"""``python -m tgated``: the same program as the ``tgated`` command."""

import sys

from tgated.cli import main

if __name__ == "__main__":
    sys.exit(main())
