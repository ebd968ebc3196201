"""``python -m jtp.capacity``: see :mod:`jtp.cli.capacity`."""

from jtp.cli.capacity import run

if __name__ == "__main__":
    run()
