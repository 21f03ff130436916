"""`python -m agent.destroy.worker_main --fd N`: one destroy worker process (started by the
daemon's pool; everything it does is in agent/destroy/workers.py).  A module of its own
so that running it does not re-import the package's `workers` module it was loaded from."""

import sys

from agent.destroy.workers import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
