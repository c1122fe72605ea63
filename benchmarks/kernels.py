"""The kernel benchmark under the name issue 31's prepared device-check command uses:
``python benchmarks/kernels.py --device-check --out $OUT`` runs ``benchmarks/kernel_speed.py`` (see its
docstring) with the same arguments."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from kernel_speed import main  # noqa: E402

if __name__ == "__main__":
    main()
