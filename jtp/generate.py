"""``python -m jtp.generate``: see :mod:`jtp.cli.generate`.

(``jtp.generate`` the function is :func:`jtp.generation.generate`; only ``python -m`` runs
this file, which nothing imports, so the name keeps meaning the function.)"""

from jtp.cli.generate import run

if __name__ == "__main__":
    run()
