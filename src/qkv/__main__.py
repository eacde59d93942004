"""``python -m qkv`` runs the command-line interface."""

from qkv.cli.main import main

raise SystemExit(main())
