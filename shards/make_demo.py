"""Build the embedded demo corpus: ``python shards/make_demo.py --help``."""

import os
import sys

# shards/ must not shadow the standard library (this file is named like the stdlib's inspect)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from multi_dist.shards.demo import main  # noqa: E402

if __name__ == "__main__":
    main()
