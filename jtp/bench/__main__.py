"""``python -m jtp.bench``: see :mod:`jtp.bench`."""

from jtp.bench import run

if __name__ == "__main__":
    run()
