"""Worker processes with their own limits, for work on hostile input off the event loop.

:mod:`runner.workers.pool` is the event loop's side (:class:`~runner.workers.pool.WorkerPool`),
:mod:`runner.workers.child` the worker's. The runner's analyzer and the broker's schema
checks each build a pool of their own on them.
"""
