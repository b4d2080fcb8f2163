"""`python -m dlora.cli`: the same as the `dlora` command."""

from dlora.cli import main

main()
