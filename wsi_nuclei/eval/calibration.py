"""Calibration of a classifier's confidences: expected calibration error."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["expected_calibration_error"]


def expected_calibration_error(
    confidence: npt.ArrayLike, correct: npt.ArrayLike, n_bins: int = 15
) -> float:
    """Expected calibration error of a classifier's confidences (Guo et al. 2017).

    The confidences are put in ``n_bins`` equal-width bins over [0, 1]; ECE is the mean over
    bins of ``|accuracy - mean confidence|`` weighted by the bin's share of the samples.

    Parameters
    ----------
    confidence : array_like of float, shape (n,)
        Probability the model gave to the class it predicted.
    correct : array_like of bool, shape (n,)
        Whether that class was right.
    n_bins : int

    Returns
    -------
    float
        ECE in [0, 1]; NaN for no samples.
    """
    conf = np.asarray(confidence, np.float64).ravel()
    ok = np.asarray(correct, bool).ravel()
    if conf.shape != ok.shape:
        raise ValueError("confidence and correct differ in length")
    if not len(conf):
        return math.nan
    idx = np.clip((conf * n_bins).astype(np.int64), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = idx == b
        if sel.any():
            ece += sel.mean() * abs(ok[sel].mean() - conf[sel].mean())
    return float(ece)
