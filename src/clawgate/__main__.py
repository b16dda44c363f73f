"""`python -m clawgate ...`: the same CLI as the `clawgate` command."""

from clawgate.cli.main import main

main()
