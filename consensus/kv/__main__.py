import sys

from consensus.kv.server import main

sys.exit(main())
