"""``python -m jtp.plan``: the capacity planner (see :mod:`jtp.planner`)."""

import sys

from jtp.planner import main

if __name__ == "__main__":
    main(sys.argv[1:])
