"""``python -m clipsearch``: the command line."""

from .cli import main

main()
