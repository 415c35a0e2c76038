import sys

from aish_client.cli import main

sys.exit(main())
