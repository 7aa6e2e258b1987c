"""sdmprune.kernels: Triton kernels, each file one op (kernel + launcher + autograd.Function +
the module/function users import), with a plain-PyTorch reference of the same math beside it.

On a machine without a GPU every op runs through its PyTorch reference unless TRITON_INTERPRET=1
asks for the Triton interpreter (tests do).
"""
from .utils import triton_available, use_triton  # noqa: F401
from .taylor_importance import accumulate_taylor_scores_  # noqa: F401
from .activation_taylor import accumulate_activation_scores_  # noqa: F401
from .gated_mlp import checkpoint_context_fn, gated_mlp_with_importance  # noqa: F401
from .fused_linear_distill_loss import FusedLinearDistillLoss, fused_linear_distill_loss  # noqa: F401
from .fused_linear_entropy_loss import fused_linear_entropy_loss  # noqa: F401
from .rms_norm import patch_rms_norms  # noqa: F401  (the function: sdmprune.kernels.rms_norm.rms_norm)
from .rotary import apply_rotary, patch_rotary  # noqa: F401
