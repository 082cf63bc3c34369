"""The paper's baselines behind the same API as nudging: proxy tuning and the ensemble.

Both compare token strings across models, so their models must share one tokenizer.
"""

from nudging_core.types import BaselineEnd, BaselineRule

from .choice import ensemble_choice, proxy_tuning_choice
from .generate import BaselineContext, TokenizerMismatch, generate_baseline
from .rounds import (
    BaselineMethod,
    Chosen,
    RoundDecision,
    ensemble_round,
    proxy_tuning_round,
)

__all__ = [
    "BaselineContext",
    "BaselineEnd",
    "BaselineMethod",
    "BaselineRule",
    "Chosen",
    "RoundDecision",
    "TokenizerMismatch",
    "ensemble_choice",
    "ensemble_round",
    "generate_baseline",
    "proxy_tuning_choice",
    "proxy_tuning_round",
]
