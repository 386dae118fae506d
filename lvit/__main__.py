"""`python -m lvit ...` (also what `accelerate launch -m lvit ...` runs)."""

from lvit.cli.app import main

main()
