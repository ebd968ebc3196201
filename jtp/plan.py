"""``python -m jtp.plan``: the capacity planner's old name. "Plan" means a tensor-parallel
plan everywhere in jtp; the planner is ``python -m jtp.capacity`` (``jtp capacity``), with
the same flags. This says so and exits 2, so a script that ran it stops instead of doing
something else."""

import sys

if __name__ == "__main__":
    args = " ".join(sys.argv[1:])
    print(
        "jtp: python -m jtp.plan is now python -m jtp.capacity (or: jtp capacity), same "
        f"flags: python -m jtp.capacity {args}".rstrip(),
        file=sys.stderr,
    )
    sys.exit(2)
