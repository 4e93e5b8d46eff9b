"""MUSE: multi-tenant score serving for fraud models.

This module is the only public import path; everything else is private.
Scores go through two levels: posterior correction undoes the lift of
training on undersampled genuine traffic, and a quantile mapping fitted on
unlabelled traffic pins the share of events above each threshold, so a
client's thresholds survive a model update.
"""

from muse._engine import Engine, EngineOptions, open_engine
from muse._errors import *  # noqa: F403 - the error types are part of the API
from muse._errors import __all__ as _error_names
from muse._models import Model, load_model
from muse._predictor import Predictor
from muse._quota import QuotaPolicy
from muse._registry import Registry
from muse._transform import DEFAULT_CURVE, QuantileMapping, posterior_correction

__all__ = [
    "DEFAULT_CURVE",
    "Engine",
    "EngineOptions",
    "Model",
    "Predictor",
    "QuantileMapping",
    "QuotaPolicy",
    "Registry",
    "load_model",
    "open_engine",
    "posterior_correction",
    *_error_names,
]
