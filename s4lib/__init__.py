"""s4lib: structured state-space sequence layers (S4, S4D) for PyTorch.

Public API: S4Block, FFTConv, the SSM kernels SSMKernelDPLR (S4) and SSMKernelDiag (S4D),
`s4lib.ops` (Cauchy / log-Vandermonde with selectable backends), `s4lib.optim`
(parameter groups from the SSM parameters' optimiser marks) and `s4lib.compat`
(loading state-spaces/s4 checkpoints); `step_threads(n)` and `set_step_backend(model, name)` steer
the recurrent step (s4lib.fused_step).
"""

from .block import S4Block
from .fftconv import FFTConv
from .fused_step import set_step_backend, step_threads
from .optim import param_groups
from .ssm_diag import SSMKernelDiag
from .ssm_dplr import SSMKernelDPLR

__version__ = "0.1.0"

__all__ = ["S4Block", "FFTConv", "SSMKernelDPLR", "SSMKernelDiag", "param_groups", "step_threads", "set_step_backend",
           "__version__"]
