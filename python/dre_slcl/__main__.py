import sys

from dre_slcl.cli import main

sys.exit(main())
