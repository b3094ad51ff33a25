"""fxfuse: structural re-parameterization on ``torch.fx`` graphs, for any model.

Training-time networks sum redundant linear branches (RepVGG's 3×3 + 1×1 + identity, ACNet's
1×3 and 3×1, MobileOne's k copies) and follow every conv with a batch norm. fxfuse rewrites the
graph so each such block is one conv::

    import fxfuse
    fused = fxfuse.optimize(model.eval(), (x,), verify=True)   # checked on drawn inputs
    print(fused.fxfuse_report)
    fxfuse.verify(model, other_candidate, (x,))  # or check any candidate yourself
    deploy.load_state_dict(fxfuse.deploy_state_dict(fused, deploy))  # your deploy class
"""

from __future__ import annotations

import logging

from fxfuse.api import optimize
from fxfuse.deploy import DeployMatchError, deploy_state_dict
from fxfuse.errors import (
    CaptureError,
    ConvergenceError,
    FxFuseError,
    FxFuseWarning,
    NondeterministicError,
    TrainingModeError,
    VerificationError,
)
from fxfuse.quant import QuantReport, quant_report
from fxfuse.rdrop import rdrop, rdrop_loss
from fxfuse.report import Decline, FusionReport, GraphStats, Part, Rewrite
from fxfuse.rules import FusionOptions, Match, RewriteContext, Rule, RuleSet, Stage
from fxfuse.training import expand, gradient_reparam, online_merge
from fxfuse.verify import VerificationReport, verify

__all__ = [
    "CaptureError",
    "ConvergenceError",
    "Decline",
    "DeployMatchError",
    "FusionOptions",
    "FusionReport",
    "FxFuseError",
    "FxFuseWarning",
    "GraphStats",
    "Match",
    "NondeterministicError",
    "Part",
    "QuantReport",
    "Rewrite",
    "RewriteContext",
    "Rule",
    "RuleSet",
    "Stage",
    "TrainingModeError",
    "VerificationError",
    "VerificationReport",
    "deploy_state_dict",
    "expand",
    "gradient_reparam",
    "online_merge",
    "optimize",
    "quant_report",
    "rdrop",
    "rdrop_loss",
    "verify",
]

__version__ = "0.1.0"

logging.getLogger("fxfuse").addHandler(logging.NullHandler())
