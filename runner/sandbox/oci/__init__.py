"""The OCI backend: task containers made by an OCI runtime (runc, crun, runsc) directly,
with no dockerd, containerd or shim on a task's path."""
