"""``python -m jtp.bench``: see :mod:`jtp.cli.bench`."""

from jtp.cli.bench import run

if __name__ == "__main__":
    run()
