"""`python -m mmpo ...` is the same as `mmpo ...` (so `torchrun -m mmpo train ...` works)."""

from mmpo.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
