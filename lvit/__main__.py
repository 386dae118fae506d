"""`python -m lvit ...` (also what `accelerate launch -m lvit ...` runs)."""

from lvit.cli import main

main()
