"""The broker side of n8n's task-runner protocol, embedded, with an HTTP API for tasks."""
