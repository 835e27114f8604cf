import sys

from hpcnn.cli import main

sys.exit(main())
