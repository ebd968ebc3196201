"""``python -m jtp.plan``: see :mod:`jtp.cli.planner`."""

from jtp.cli.planner import run

if __name__ == "__main__":
    run()
