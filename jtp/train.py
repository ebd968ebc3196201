"""``python -m jtp.train``: see :mod:`jtp.cli.train`."""

from jtp.cli.train import run

if __name__ == "__main__":
    run()
