import sys

from tgated.cli import main

sys.exit(main())
