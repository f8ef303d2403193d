"""The evaluation tool's parts; `python tools/evaluate.py --help` is the entry point."""
