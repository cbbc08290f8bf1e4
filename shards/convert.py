"""Convert public benchmark annotations into webdataset shards: ``python shards/convert.py --help``."""

import os
import sys

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from multi_dist.shards.convert import main  # noqa: E402

if __name__ == "__main__":
    main()
