"""``python -m jtp SUBCOMMAND``: the ``jtp`` command (:mod:`jtp.cli.main`)."""

from jtp.cli.main import main

if __name__ == "__main__":
    main()
