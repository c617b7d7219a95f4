"""`python -m train` / `torchrun --nproc_per_node N -m train`."""

import os

# Set before torch loads OpenMP: idle OpenMP workers spin briefly, then sleep. libgomp's default spin (300,000
# rounds) made a shared 2-core machine's DiT-S/2 step 1.7x slower (5.17 vs 3.06 s with one other busy process);
# sleeping at once costs ~4% on an idle one (1.65 vs 1.58-1.62 s); 3,000 rounds keeps both (docs/training.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "3000")

from train.cli import main  # noqa: E402

main()
