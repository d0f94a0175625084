"""Offline sample-quality metrics (FID, IS, mIS, AM, NDB, mel FD) and the evaluation classifier they use.

See docs/metrics.md for the formulas, which direction is better, and measured scores.
"""

from .classifier import ClassifierConfig, EvalClassifier
from .functional import (am_score, frechet_distance, frechet_distance_gaussians, gaussian_statistics,
                         inception_score, modified_inception_score, ndb)
from .score import ScoreInputError, mel_frechet_distance, score
from .training import train_classifier

__all__ = ["score", "ScoreInputError", "EvalClassifier", "ClassifierConfig", "frechet_distance",
           "frechet_distance_gaussians", "gaussian_statistics", "inception_score", "modified_inception_score",
           "am_score", "ndb", "mel_frechet_distance", "train_classifier"]
