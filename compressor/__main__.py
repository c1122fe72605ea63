"""`python -m compressor ...` runs the command line, the same as the `compressor` script."""

from compressor.cli import main

main()
