"""The ``tfreg`` command-line interface (click). Commands are thin: parse, call the core, print."""
