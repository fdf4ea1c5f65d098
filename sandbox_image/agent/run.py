"""Entry point of the task container: ``python3 -I -B /opt/sandbox-agent/run.py``.

Isolated mode (-I) puts neither the script's folder nor PYTHON* variables on the
path, so the agent's own folder is added explicitly, and nothing else. The image
adds ``--own-pid-namespace`` (see ``sandbox_agent.agent.OWN_PID_NAMESPACE_FLAG``).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sandbox_agent.agent import main

sys.exit(main(sys.argv[1:]))
