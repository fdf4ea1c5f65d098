"""n8n's task-runner protocol: wire models, codec, and the sans-I/O runner state machine.

Nothing here does I/O: :mod:`runner.broker` (client) and :mod:`runner.broker_server`
(our broker) are the adapters that own sockets and timers.
"""
