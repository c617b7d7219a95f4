"""`python -m train` / `torchrun --nproc_per_node N -m train`."""

from train.cli import main

main()
