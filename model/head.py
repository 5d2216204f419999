"""BiART's output layer in training: which rows of ``lm_head`` a target is scored over, and a
cross-entropy over them that never holds the (B, T, vocab) logits.

Heads (``BiARTConfig.head``):

    restricted   a target position's softmax is over its own modality only: image positions over
                 the image codes, text positions over the text pieces and PAD, which is what
                 generation samples from (``BiART.generate`` never draws the other modality)
    full         the softmax over the whole vocabulary, start tokens included (the plain language-model
                 loss, kept to compare against)

Loss (``nll_sum``): positions in chunks of ``BiARTConfig.loss_chunk``; each chunk's logits are
computed in the compute dtype, their log-softmax in fp32, and the chunk's gradients with respect to
the hidden states and the head's rows right away (Liger-Kernel's fused linear cross-entropy,
github.com/linkedin/Liger-Kernel, ``fused_linear_cross_entropy.py``), so the backward pass only
scales them: no chunk's logits outlive it, and the head's three GEMMs are done once each. The
head's gradient is accumulated in fp32 over the chunks.

Padding (``BiARTConfig.pad_vocab_to``): ``lm_head`` gets rows up to a multiple of it, never
sampled and never in the loss. It helps the restricted head only on its text rows: 49809 in the
paper's layout, an odd GEMM width whose bf16 logits rows are not 16-byte aligned (the H100 profile in
benchmarks/README.md found the full head's 58003 in a slow kernel for that reason), so with padding
the slice is widened to the multiple (49856 with 64) with the rows that follow it (SOC, SOI,
padding), which are masked out. The image rows (8192) are a multiple of 128 already.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def padded(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


def head_rows(cfg, part: str) -> tuple[int, int, int]:
    """(first row, rows computed, classes) of ``lm_head`` a target of ``part`` ("text" or
    "image") is scored over; rows beyond ``classes`` are padding of the GEMM, masked out. A target
    id t is class ``t - first row``."""
    total = padded(cfg.vocab_size, cfg.pad_vocab_to)
    if cfg.head == "full":
        return 0, total, cfg.vocab_size
    lo, classes = (0, cfg.image_vocab) if part == "image" else (cfg.text_offset, cfg.text_vocab + 1)
    return lo, min(padded(classes, cfg.pad_vocab_to), total - lo), classes


def fit_head_rows(model: nn.Module, state: dict, prefix: str, *args) -> None:
    """Load-state-dict hook: an ``lm_head`` saved with other padding (``pad_vocab_to``) is cut or
    zero-padded to this model's rows, so files load both ways; rows of the vocabulary must all be
    there, and rows cut off must be padding."""
    key, rows = prefix + "lm_head.weight", model.lm_head.weight.shape[0]
    w = state.get(key)
    if w is None or w.shape[0] == rows or w.shape[0] < model.cfg.vocab_size:
        return  # nothing to fit (a mismatch of the vocabulary itself is load_state_dict's error)
    state[key] = w[:rows] if w.shape[0] > rows else torch.cat([w, w.new_zeros(rows - w.shape[0], w.shape[1])])


def nll_from_logits(logits: Tensor, targets: Tensor, classes: int) -> Tensor:
    """(N, rows) logits and (N,) classes -> (N,) NLL in fp32 over the first ``classes`` columns:
    the plain path, which holds all the logits."""
    return F.cross_entropy(logits[:, :classes].float(), targets, reduction="none")


class OutputLayer(nn.Linear):
    """``lm_head``: a bias-free Linear (plain logits when called with hidden states alone) that,
    called with targets, returns ``nll_sum`` over its rows ``rows``. The loss uses the weight inside
    the layer's own call, where ZeRO-3 gathers a module's partitioned parameters."""

    def __init__(self, n_embd: int, rows: int):
        super().__init__(n_embd, rows, bias=False)

    def forward(self, x: Tensor, targets: Tensor | None = None, mask: Tensor | None = None,
                rows: tuple[int, int, int] = (0, 0, 0), chunk: int = 0) -> Tensor:
        if targets is None:
            return super().forward(x)
        lo, n, classes = rows
        return nll_sum(x, self.weight[lo:lo + n], targets, mask, classes, chunk or x.shape[0])


def nll_sum(x: Tensor, weight: Tensor, targets: Tensor, mask: Tensor, classes: int, chunk: int) -> Tensor:
    """sum(mask * NLL) of (N, C) hidden states scored by (rows, C) ``weight`` against (N,) classes,
    ``chunk`` positions at a time (see the module doc); an fp32 scalar."""
    return _ChunkedNLL.apply(x, weight, targets, mask.float(), classes, chunk)


class _ChunkedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, targets: Tensor, mask: Tensor, classes: int, chunk: int) -> Tensor:
        device = x.device.type
        # the dtype autocast would give the GEMM (bf16 under DeepSpeed's bf16 or torch.autocast)
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if grads else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if grads else None
        with torch.autocast(device, enabled=False):
            xc, wc = x.to(dtype), weight.to(dtype)
            for s in range(0, x.shape[0], chunk):
                xs, t, m = xc[s:s + chunk], targets[s:s + chunk], mask[s:s + chunk]
                z = (xs @ wc.T).float()  # (n, rows); below, in place: no other tensor of its size
                if classes < z.shape[1]:
                    z[:, classes:] = float("-inf")
                target_logit = z.gather(1, t[:, None])
                top = z.amax(dim=1, keepdim=True)
                norm = z.sub_(top).exp_().sum(dim=1, keepdim=True)  # z is now exp(logits - top)
                total += ((top + norm.log() - target_logit).squeeze(1) * m).sum()
                if grads:  # d(sum m * nll)/dlogits = m * (softmax - onehot(t))
                    z.div_(norm)
                    z[torch.arange(len(t), device=z.device), t] -= 1
                    g = z.mul_(m[:, None]).to(dtype)
                    grad_x[s:s + chunk] = g @ wc
                    grad_w += (g.T @ xs).float()
                    del g
                del z  # before the next chunk's logits
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_x, grad_w = ctx.saved_tensors
        return (grad_x * grad_out.to(grad_x.dtype), (grad_w * grad_out).to(ctx.weight_dtype),
                None, None, None, None)
