import sys

from fmtune.cli import main

sys.exit(main())
