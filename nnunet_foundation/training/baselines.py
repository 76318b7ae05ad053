"""Budget variants of the stock ``nnUNetTrainer`` (labeled-only lower bound and fully supervised upper bound).

nnU-Net already ships ``nnUNetTrainer_5epochs`` and friends; only this package's extra budgets are added here.
"""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_foundation.training.budgets import make_budget_variants

__all__ = make_budget_variants(nnUNetTrainer, globals(), skip_existing_nnunet_names=True)
