"""``python -m charlstm`` runs the command-line interface."""

from charlstm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
