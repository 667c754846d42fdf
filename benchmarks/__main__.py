import sys

from benchmarks.run import main

if __name__ == "__main__":  # spawned helpers (the reward pool) re-import this module
    sys.exit(main())
