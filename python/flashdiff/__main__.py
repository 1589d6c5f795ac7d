import sys

from flashdiff.cli import main

sys.exit(main())
