"""``torchrun --nproc-per-node N -m trainer_client.train_decomposed --grid RxC --synthetic ...``

Entry point only; the loop lives in :mod:`trainer_client.decomposed.train`.
"""

from trainer_client.decomposed.train import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
