"""Check the paper yourself: its formulas and the exactness of t = 1 against what executes.

Each check returns a result with ``.passed``, ``.table()`` and ``.to_json()``; the CLI verb
``minibasis verify formulas | exactness | counts`` prints the table and exits 1 on a failure.

* :func:`check_formulas`: random layer geometries (hypothesis search and shrinking when it is
  installed); measured multiplications of Conv2d and BasisConv2d, forward and backward, and
  their parameter counts against the closed forms of :mod:`minibasis.formulas`.
* :func:`check_exactness`: every conv of a model replaced at t = 1; relative errors of the
  reconstructed weights, of each layer's output and of the logits, against bounds per dtype.
* :func:`check_counts`: per conv layer of a network, as it is and compressed at each threshold,
  measured forward and backward multiplications against the closed forms.
"""
from minibasis.verify.layer_formulas import (CaseOutcome, FormulaReport, GeometrySpace, LayerCase, check_formulas,
                                             run_case)
from minibasis.verify.counts import CountRow, CountsReport, check_counts
from minibasis.verify.exactness import BOUNDS, ExactnessBounds, ExactnessReport, LayerExactness, check_exactness
from minibasis.verify.report import VerifyResult

__all__ = ["check_formulas", "FormulaReport", "LayerCase", "GeometrySpace", "CaseOutcome", "run_case",
           "check_exactness", "ExactnessReport", "LayerExactness", "ExactnessBounds", "BOUNDS",
           "check_counts", "CountsReport", "CountRow", "VerifyResult"]
