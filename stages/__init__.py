"""DVC stages: `python -m stages.<name>` from the repo root. Thin: read params, call the library, write outs."""
