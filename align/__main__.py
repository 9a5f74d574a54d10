import sys

from align.commands.cli import main

sys.exit(main())
