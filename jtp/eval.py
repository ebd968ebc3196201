"""``python -m jtp.eval``: see :mod:`jtp.cli.eval`."""

from jtp.cli.eval import run

if __name__ == "__main__":
    run()
