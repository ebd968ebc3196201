"""Worker for test_watchdog_and_programs: the watchdog alone, in a fresh process.

python mp_hang_watchdog_worker.py TIMEOUT   (a watched region that never ends)
"""

import sys
import time

from jtp.distributed import watchdog, watching

watchdog.arm(float(sys.argv[1]))
with watching("the outer step", 7), watching("a peer that never answers"):
    print("waiting", flush=True)
    time.sleep(120)
print("not reached", flush=True)
