"""`python -m echocxr` (used by `torchrun -m echocxr train ...`)."""

from echocxr.cli import main

raise SystemExit(main())
