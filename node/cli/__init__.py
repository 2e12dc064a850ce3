"""Command line: `python -m node {generate,serve,cache,bench}` and `python -m node --demo`."""
