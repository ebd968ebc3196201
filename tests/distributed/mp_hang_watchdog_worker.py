"""Worker for test_watchdog_and_programs: the watchdog alone, in a fresh process.

python mp_hang_watchdog_worker.py TIMEOUT            (a watched region that never ends)
python mp_hang_watchdog_worker.py TIMEOUT untimed    (a long untimed region inside a
                                                      watched one, as a compile: survives)
"""

import sys
import time

from jtp.distributed import watchdog, watching

watchdog.arm(float(sys.argv[1]))
if sys.argv[2:] == ["untimed"]:
    with watching("the outer step", 7), watchdog.watch("a compile", timed=False):
        time.sleep(4 * float(sys.argv[1]))
    print("survived the untimed region", flush=True)
    sys.exit(0)
with watching("the outer step", 7), watching("a peer that never answers"):
    print("waiting", flush=True)
    time.sleep(120)
print("not reached", flush=True)
