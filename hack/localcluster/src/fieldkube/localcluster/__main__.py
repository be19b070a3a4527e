"""`python -m fieldkube.localcluster up|down|status|spawn` (what `make cluster` runs)."""

import sys

from fieldkube.localcluster.harness import main

sys.exit(main())
