import sys

from censusvi.cli import main

sys.exit(main())
