"""Way (a) of ``make bench``: a forkserver on the host, the strongest real baseline.

:mod:`bench.forkserver.server` is the long-lived process that forks a child per task
(standard library and the agent bundle only); :mod:`bench.forkserver.sandbox` is the
runner-side :class:`~runner.sandbox.base.Sandbox` that starts it once and talks to it.
No isolation: never a way to run untrusted code.
"""

from bench.forkserver.sandbox import ForkserverSandbox

__all__ = ["ForkserverSandbox"]
