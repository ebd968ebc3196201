"""``python -m jtp.prepare``: see :mod:`jtp.cli.prepare`."""

from jtp.cli.prepare import run

if __name__ == "__main__":
    run()
