"""``python -m tfreg`` runs the command-line interface."""

from tfreg_cli.main import main

if __name__ == "__main__":
    main()
