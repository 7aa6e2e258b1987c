"""The LM-head losses of the package, through each model's own logit scale: one place for the Taylor
engines (sdmprune.scoring.taylor), recovery training (sdmprune.recovery.trainer), perplexity
(sdmprune.evaluate) and ``lm_loss``, the entry another pruning loop calls.

- ``head_states(model, input_ids, ...)``: the final hidden states as the LM head's loss must see them,
  ``logit_scale * h`` (models.LlamaFamilyAdapter.logit_scale: Granite divides its logits, Cohere
  multiplies them), so that ``head_states @ W^T`` are the model's own logits;
- ``head_loss(hidden, weight, objective, ...)``: one objective on rows of those states through the fused
  kernels (sdmprune.kernels), never an N x V tensor:

  ``"ce"``       mean over rows with a label (labels already shifted, -100 ignored) of -log softmax(z)[label]
  ``"distill"``  (1 - alpha) CE + alpha KL(softmax(z_t / T) || softmax(z_s)), KL a mean over counted rows
  ``"entropy"``  mean over counted rows of -sum_v p log p, p = softmax(z) (label-free, HFPrune's loss)

- ``lm_loss(model, input_ids, objective=...)``: both, with the causal-LM labels; what replaces
  ``model(input_ids, labels=input_ids).loss`` in a loop that computes gradients.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import InputError
from ..models import get_adapter
from .passes import causal_labels

LOSS_OBJECTIVES = ("ce", "distill", "entropy")


def head_states(model, input_ids: torch.Tensor, *, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, adapter=None) -> torch.Tensor:
    """[B, L, d] final (normed) hidden states of ``model``'s decoder body on ``input_ids`` [B, L], times
    the model's logit scale: ``head_states @ lm_head.weight^T`` are the model's logits. Differentiable
    through the body (in the model's dtype); the KV cache is off."""
    adapter = adapter if adapter is not None else get_adapter(model)
    h = adapter.body(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).last_hidden_state
    return adapter.head_input(model, h)


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, objective: str, labels: Optional[torch.Tensor] = None,
              teacher_hidden: Optional[torch.Tensor] = None, *, teacher_weight: Optional[torch.Tensor] = None,
              alpha: float = 0.0, temperature: float = 1.0, mask: Optional[torch.Tensor] = None,
              return_parts: bool = False, backend: str = "auto", token_chunk: Optional[int] = None):
    """One objective (module docstring) on ``hidden`` [N, d] rows of ``head_states``; a float32 scalar, or
    (loss, ce, kl) with ``return_parts`` ("ce"/"distill"; ce and kl detached).

    ``hidden`` is differentiated; ``weight`` [V, d] (the LM head) gets a gradient exactly when it requires
    one. ``labels`` [N] int64, already shifted ("ce", "distill"). ``teacher_hidden`` [N, d]: the teacher's
    ``head_states`` rows ("distill"; never differentiated), ``teacher_weight`` its LM head (default
    ``weight``). ``mask`` [N] bool: the rows counted in KL ("distill") or in the entropy mean ("entropy");
    None = every row. ``backend``/``token_chunk``: the fused kernels' (sdmprune.kernels)."""
    from sdmprune.kernels.fused_linear_distill_loss import fused_linear_distill_loss
    from sdmprune.kernels.fused_linear_entropy_loss import fused_linear_entropy_loss

    if objective == "entropy":
        if return_parts:
            raise InputError("objective 'entropy' has no parts (return_parts: 'ce' and 'distill')")
        return fused_linear_entropy_loss(hidden, weight, mask, backend=backend, token_chunk=token_chunk)
    if objective == "ce":
        teacher_hidden, teacher_weight, alpha, mask = None, None, 0.0, None
    elif objective != "distill":
        raise InputError(f"objective must be one of {', '.join(LOSS_OBJECTIVES)}, got {objective!r}")
    return fused_linear_distill_loss(hidden, weight, labels, teacher_hidden, teacher_weight=teacher_weight,
                                     alpha=alpha, temperature=temperature, kl_mask=mask,
                                     return_parts=return_parts, backend=backend, token_chunk=token_chunk)


def lm_loss(model, input_ids: torch.Tensor, objective: str = "ce", *, labels: Optional[torch.Tensor] = None,
            attention_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
            teacher_hidden: Optional[torch.Tensor] = None, teacher_weight: Optional[torch.Tensor] = None,
            alpha: Optional[float] = None, temperature: Optional[float] = None, backend: str = "auto",
            token_chunk: Optional[int] = None, return_parts: bool = False) -> torch.Tensor:
    """The loss of ``model`` (a LLaMA-family causal LM) on ``input_ids`` [B, L] through its own LM head and
    logit scale, by the fused kernels: never the [B, L, V] logits. A float32 scalar to call
    ``.backward()`` on; every parameter that requires grad gets its gradient (the LM-head weight
    included), so a loop's Taylor importance reads the same ``.grad`` as after the model's own loss.

    ``"ce"``: the Hugging Face causal-LM loss, ``model(input_ids, labels=input_ids).loss``: position t
    predicts ``labels[t + 1]`` (``labels`` default ``input_ids``; -100 is ignored), a mean over the
    predicted tokens of the batch.
    ``"distill"``: ``(1 - alpha) * CE + alpha * KL(softmax(z_t / temperature) || softmax(z_s))``, KL a mean
    over every counted position; ``teacher_hidden`` [B, L, d] = ``head_states(teacher, input_ids)`` under
    no_grad (the teacher's final hidden states with its logit scale), ``teacher_weight`` its LM head when it
    is not this model's; ``alpha`` and ``temperature`` must be given.
    ``"entropy"``: the mean over every counted position of the entropy of the model's own next-token
    distribution (no labels): HFPrune's calibration loss (a pooled mean: the per-sample means summed
    equal it times B only when every sample counts as many positions).

    ``attention_mask`` [B, L] (1 = token, 0 = padding) goes to the model, and padding counts in no
    term: a position is predicted only when it and the one before it are tokens. ``return_parts``:
    (loss, ce, kl) for "ce"/"distill"."""
    if objective not in LOSS_OBJECTIVES:
        raise InputError(f"objective must be one of {', '.join(LOSS_OBJECTIVES)}, got {objective!r}")
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() != 2 or input_ids.is_floating_point():
        raise InputError(f"input_ids must be integer token ids [B, L], got {input_ids.dtype} {tuple(input_ids.shape)}")
    B, L = input_ids.shape
    distill = objective == "distill"
    if distill and (teacher_hidden is None or alpha is None or temperature is None):
        raise InputError("objective 'distill' needs teacher_hidden (head_states of the teacher), alpha and temperature")
    if not distill and (teacher_hidden is not None or teacher_weight is not None):
        raise InputError(f"objective {objective!r} takes no teacher (teacher_hidden is for 'distill')")
    if objective == "entropy" and (labels is not None or return_parts):
        raise InputError("objective 'entropy' takes no labels and has no parts (return_parts: 'ce' and 'distill')")
    for name, t in (("labels", labels), ("attention_mask", attention_mask)):
        if t is not None and tuple(t.shape) != (B, L):
            raise InputError(f"{name} must be [B, L] = [{B}, {L}] like input_ids, got {tuple(t.shape)}")

    adapter = get_adapter(model)
    weight = adapter.lm_head(model).weight
    h = head_states(model, input_ids, attention_mask=attention_mask, position_ids=position_ids, adapter=adapter)
    d = h.shape[-1]
    if distill and tuple(teacher_hidden.shape) != (B, L, d):
        raise InputError(f"teacher_hidden must be [B, L, d] = [{B}, {L}, {d}], got {tuple(teacher_hidden.shape)}")
    real = None if attention_mask is None else attention_mask.to(device=h.device).bool()
    targets = None
    if objective != "entropy":
        targets = causal_labels((input_ids if labels is None else labels).to(h.device))
        if real is not None:
            # a target counts only when the position predicting it and the target are both tokens
            next_real = torch.zeros_like(real)
            next_real[:, :-1] = real[:, 1:]
            targets = targets.masked_fill(~(real & next_real), -100)
        targets = targets.reshape(-1)
    return head_loss(h.reshape(-1, d), weight, objective, targets,
                     teacher_hidden.to(h.device).reshape(-1, d) if distill else None, teacher_weight=teacher_weight,
                     alpha=float(alpha) if distill else 0.0, temperature=float(temperature) if distill else 1.0,
                     mask=None if real is None else real.reshape(-1), return_parts=return_parts, backend=backend,
                     token_chunk=token_chunk)
