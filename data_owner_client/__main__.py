"""`python -m data_owner_client` (also what `torchrun -m data_owner_client` runs)."""

from data_owner_client.cli import main

main()
