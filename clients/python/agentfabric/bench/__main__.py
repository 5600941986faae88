"""``python -m agentfabric.bench``: see ``agentfabric.bench`` and ``JSON.md``."""

import sys

from .runner import main

sys.exit(main())
