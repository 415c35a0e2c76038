import sys

from aish_client.oneshot import main

sys.exit(main())
