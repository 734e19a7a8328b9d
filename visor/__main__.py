import sys

from visor.cli.main import main

sys.exit(main())
