# The static analyzer rejects this before any container exists.
import os

return [{"json": {"cwd": os.getcwd(), "env": dict(os.environ)}}]
