import sys

from tekton.cli import main

sys.exit(main())
