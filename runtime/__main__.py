"""`python -m runtime ...`: see runtime/cli.py."""

from .cli import main

if __name__ == "__main__":
    main()
