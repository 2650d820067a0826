import sys

from bitune.cli import main

sys.exit(main())
