"""`python -m runtime ...`: see runtime/cli.py."""

from .cli import main

main()
