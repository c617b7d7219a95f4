"""`python -m train` / `torchrun --nproc_per_node N -m train`."""

import os

# Set before torch loads OpenMP: idle OpenMP workers sleep instead of spinning. On a CPU shared with other
# processes, spinning workers made a 2-thread training step 6x slower (2.09 s vs 0.33 s with 1 thread);
# passive waiting keeps 2 threads at least as fast as 1 (docs/training.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from train.cli import main  # noqa: E402

main()
