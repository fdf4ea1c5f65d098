"""``python -m sandbox_agent``: run one task (see :mod:`sandbox_agent.agent`)."""

import sys

from .agent import main

sys.exit(main(sys.argv[1:]))
