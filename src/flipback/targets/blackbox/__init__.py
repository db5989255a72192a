"""Black-box targets: models seen only through their answers, behind one query-accounting layer.

    from flipback.targets.blackbox import load_blackbox, BudgetExceeded, TargetError
    target = load_blackbox("http://127.0.0.1:8080/v2/models/resnet20", num_classes=10, budget=10_000)
    answer = target.query(images, ids)      # images (N,C,H,W) in [0,1]; one query per image
    answer.labels, answer.scores             # scores is None in hard-label mode (output="label")
    target.queries, target.queries_for(ids)  # exact counts, total and per image

Backends: a Python callable (callable.py), an ONNX file (onnx.py), an Open Inference Protocol
server (oip.py), and any white-box SPEC run as a black box. The accounting, budgets, retries and
rate limiting are in accountant.py, the same for all.
"""

from .accountant import BlackBoxTarget
from .base import Answer, Backend, BackendFailure, BudgetExceeded, TargetError
from .callable import CallableBackend, TorchBackend
from .oip import OipBackend
from .spec import from_callable, from_module, load_backend, load_blackbox

__all__ = ["Answer", "Backend", "BackendFailure", "BlackBoxTarget", "BudgetExceeded", "CallableBackend",
           "OipBackend", "TargetError", "TorchBackend", "from_callable", "from_module", "load_backend",
           "load_blackbox"]
