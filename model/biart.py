"""BiART: one decoder-only transformer that generates images from text and text from images.

Kim et al. 2021, "L-Verse: Bidirectional Generation Between Image and Text" (arXiv:2111.11133),
section 3.2. The transformer is minGPT's (github.com/karpathy/minGPT): pre-LayerNorm blocks,
learned absolute positions, dropout on embeddings, residuals and attention.

Sequences (``build_sequence``), with C = SOC, I = SOI:

    text->image   [C] t_1 .. t_64 [I] v_1 .. v_1024     text is REF (the condition), image GEN
    image->text   [I] v_1 .. v_1024 [C] t_1 .. t_64     image is REF, text GEN

Ids: image codes 0..image_vocab-1, text pieces next, then PAD, SOC, SOI; all derived from the
config. A [REF]/[GEN] segment embedding is added to every token, the start token of a block
carrying its block's segment. Positions are learned per block, not per sequence index: image
token k has the same position embedding in both directions (and so does text token k), so what
one direction learns about the layout of an image or a caption serves the other. Training
optimises both parts: ``loss = ref_weight * NLL(REF) + gen_weight * NLL(GEN)``; text after the
first PAD is ignored, the first PAD being the end-of-text target. By default each target is scored
over its own modality only (the image codes, or the text pieces and PAD), in chunks of positions
that never hold the whole (B, T, vocab) logits: ``head.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lverse.core.errors import InputError
from lverse.core.vocab import VOCAB_SIZE

from .head import OutputLayer, fit_head_rows, head_rows, nll_from_logits, padded


class Direction(IntEnum):
    T2I = 0  # text -> image
    I2T = 1  # image -> text


REF, GEN = 0, 1  # segment ids


@dataclass(frozen=True)
class BiARTConfig:
    n_layer: int = 32  # transformer blocks
    n_head: int = 16  # attention heads
    n_embd: int = 1024  # model width
    image_vocab: int = 8192  # AugVAE codebook size
    text_vocab: int = VOCAB_SIZE  # caption tokenizer pieces
    text_len: int = 64  # text tokens per sequence (padded with PAD)
    image_len: int = 1024  # image tokens per sequence (AugVAE-SL: 32x32)
    embd_pdrop: float = 0.1  # dropout on the summed embeddings
    resid_pdrop: float = 0.1  # dropout on each residual branch
    attn_pdrop: float = 0.1  # dropout on attention probabilities
    ref_loss_weight: float = 1.0  # weight of the condition part's NLL
    gen_loss_weight: float = 1.0  # weight of the target part's NLL
    # Recompute each block in the backward pass instead of keeping its activations (training
    # only): less memory, the same numbers. Set from the run config's activation_checkpointing.
    activation_checkpointing: bool = False
    # "restricted": each target's softmax over its own modality (image codes; text pieces + PAD), as
    # generation samples; "full": over the whole vocabulary (the plain language-model loss, kept to compare against).
    # Restricted is the faster step, and the demo still learns (benchmarks/README.md, docs/demo.md). A
    # config saved without the field loads with this default (the weights are the same).
    head: str = "restricted"
    # Positions per chunk of the output layer and its cross-entropy in training (head.py); 0: the
    # plain path, all logits at once (kept for comparison). Changes memory, not the numbers.
    loss_chunk: int = 1024
    # lm_head rows padded to a multiple of this (1: none), never sampled nor scored; the restricted
    # head's text rows are scored over the multiple (head.py). Aligned GEMMs on GPUs (nanoGPT:
    # 50257 -> 50304; configs/train_cc3m.yaml sets 64); 1 here, since it changes lm_head's shape.
    pad_vocab_to: int = 1

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise InputError(f"n_embd {self.n_embd} must be divisible by n_head {self.n_head}")
        if self.head not in ("restricted", "full"):
            raise InputError(f"head must be 'restricted' or 'full', got {self.head!r}")
        if self.loss_chunk < 0 or self.pad_vocab_to < 1:
            raise InputError(f"loss_chunk must be >= 0 and pad_vocab_to >= 1, got {self.loss_chunk} and "
                             f"{self.pad_vocab_to}")

    @property
    def text_offset(self) -> int:
        return self.image_vocab

    @property
    def pad_id(self) -> int:
        return self.image_vocab + self.text_vocab

    @property
    def soc_id(self) -> int:
        return self.pad_id + 1

    @property
    def soi_id(self) -> int:
        return self.pad_id + 2

    @property
    def vocab_size(self) -> int:
        return self.pad_id + 3

    @property
    def seq_len(self) -> int:
        """Tokens in a full sequence, both start tokens included."""
        return self.text_len + self.image_len + 2

    def spans(self, direction: Direction) -> dict[str, tuple[int, int]]:
        """[start, end) of the text and image content tokens in a full sequence."""
        first, second = (("text", self.text_len), ("image", self.image_len))[::1 if direction == Direction.T2I else -1]
        return {first[0]: (1, 1 + first[1]), second[0]: (first[1] + 2, self.seq_len)}


PRESETS: dict[str, BiARTConfig] = {
    "biart-500m": BiARTConfig(),
    # The paper's vocabulary and lengths on a narrow model: the sampling benchmark's preset.
    "biart-mini": BiARTConfig(n_layer=4, n_head=4, n_embd=256),
    # Seconds on a CPU: pairs with the AugVAE debug-sl preset (64 tokens of 512 codes).
    "debug": BiARTConfig(n_layer=2, n_head=2, n_embd=64, image_vocab=512, text_vocab=256,
                         text_len=16, image_len=64),
}


class KVCache:
    """Keys and values of every layer, preallocated for ``max_len`` positions."""

    def __init__(self, cfg: BiARTConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.pos = 0  # positions filled so far

    def repeat_interleave(self, n: int) -> None:
        """Each row n times, in place: a prompt's keys and values computed once serve n samples."""
        self.k = [t.repeat_interleave(n, dim=0) for t in self.k]
        self.v = [t.repeat_interleave(n, dim=0) for t in self.v]

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.pos + k.shape[2]
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: BiARTConfig):
        super().__init__()
        self.n_head, self.attn_pdrop = cfg.n_head, cfg.attn_pdrop
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_drop = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x: Tensor, cache: KVCache | None, layer: int) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.append(layer, k, v)
        if past and T > 1:
            raise InputError("a cached forward takes one token at a time after the prompt")
        # Flash / memory-efficient kernels on CUDA, math on the CPU. With a cache and one query,
        # every cached position is visible, so no mask is needed.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=past == 0 and T > 1,
                                           dropout_p=self.attn_pdrop if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    def __init__(self, cfg: BiARTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.resid_pdrop))

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class BiART(nn.Module):
    def __init__(self, cfg: BiARTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.n_embd)  # text block then image block
        self.wse = nn.Embedding(2, cfg.n_embd)  # REF, GEN
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        # Rows padded for the GEMMs (pad_vocab_to); wte is only indexed, so it keeps vocab_size rows.
        self.lm_head = OutputLayer(cfg.n_embd, padded(cfg.vocab_size, cfg.pad_vocab_to))
        self.register_load_state_dict_pre_hook(fit_head_rows)
        pos, seg = self._layout()
        self.register_buffer("pos_ids", pos, persistent=False)  # (2, seq_len) per direction
        self.register_buffer("seg_ids", seg, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _layout(self) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        text = torch.arange(cfg.text_len + 1)  # start token + content
        image = torch.arange(cfg.image_len + 1) + cfg.text_len + 1
        pos = torch.stack([torch.cat([text, image]), torch.cat([image, text])])
        seg = torch.stack([torch.cat([torch.full_like(text, REF), torch.full_like(image, GEN)]),
                           torch.cat([torch.full_like(image, REF), torch.full_like(text, GEN)])])
        return pos, seg

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor, direction: Direction, targets: Tensor | None = None,
                cache: KVCache | None = None, return_logits: bool | None = None,
                ) -> tuple[Tensor | None, dict[str, Tensor] | None]:
        """Next-token logits for a sequence laid out for ``direction``.

        Args:
            idx: (B, T) token ids, the sequence's first T tokens (or, with ``cache``, the next T).
            targets: (B, T) the next tokens (``seq[:, 1:]`` of a full sequence) for the loss.
            cache: a KVCache to read and extend (generation).
            return_logits: with targets, compute the (B, T, vocab) logits and the loss from them
                (the plain path). None: only outside training or with ``loss_chunk`` 0; in
                training the loss is computed in chunks without them (as Liger-Kernel's models
                skip the logits when given labels in training).
        Returns:
            logits (B, T, vocab) with targets (None where skipped), else (B, 1, vocab) of the
            last position only; losses {"loss", "ref", "gen"} with targets, else None.
        """
        x = self.hidden_states(idx, direction, cache)
        if targets is None:
            return self.logits(x[:, -1:]), None
        if return_logits is None:
            return_logits = not self.training or not self.cfg.loss_chunk
        if return_logits:
            logits = self.logits(x)
            return logits, self.loss(logits, targets, direction)
        return None, self.chunked_loss(x, targets, direction)

    def logits(self, x: Tensor) -> Tensor:
        """(..., n_embd) hidden states -> (..., vocab) logits (lm_head's padding rows left out)."""
        return self.lm_head(x)[..., :self.cfg.vocab_size]

    def hidden_states(self, idx: Tensor, direction: Direction, cache: KVCache | None = None) -> Tensor:
        """(B, T) ids -> (B, T, n_embd) final-LayerNorm outputs; extends ``cache`` when given."""
        T = idx.shape[1]
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.seq_len:
            raise InputError(f"sequence of {start + T} tokens exceeds seq_len {self.cfg.seq_len}")
        pos, seg = self.pos_ids[direction, start:start + T], self.seg_ids[direction, start:start + T]
        x = self.drop(self.wte(idx) + self.wpe(pos) + self.wse(seg))
        recompute = self.cfg.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for layer, block in enumerate(self.blocks):
            if recompute:  # non-reentrant: dropout is replayed exactly in the recomputation
                x = checkpoint(block, x, None, layer, use_reentrant=False)
            else:
                x = block(x, cache, layer)
        if cache is not None:
            cache.pos += T
        return self.ln_f(x)

    def loss(self, logits: Tensor, targets: Tensor, direction: Direction) -> dict[str, Tensor]:
        """Weighted NLL of the REF and GEN parts from (B, T, vocab) logits (the plain path).
        ``targets[:, j]`` is sequence position j + 1; which targets count and over which rows of
        the head they are scored: ``_weighted``."""
        def part_sum(span: slice, rows: tuple[int, int, int], classes: Tensor, mask: Tensor) -> Tensor:
            lo, n, k = rows
            nll = nll_from_logits(logits[:, span, lo:lo + n].flatten(0, 1), classes.flatten(), k)
            return (nll * mask.flatten()).sum()
        return self._weighted(targets, direction, part_sum)

    def chunked_loss(self, x: Tensor, targets: Tensor, direction: Direction) -> dict[str, Tensor]:
        """``loss`` from (B, T, n_embd) hidden states, ``cfg.loss_chunk`` positions at a time,
        without the (B, T, vocab) logits (head.py)."""
        def part_sum(span: slice, rows: tuple[int, int, int], classes: Tensor, mask: Tensor) -> Tensor:
            h = x[:, span].flatten(0, 1)  # (B * part length, n_embd)
            return self.lm_head(h, classes.flatten(), mask.flatten(), rows, self.cfg.loss_chunk)
        return self._weighted(targets, direction, part_sum)

    def _weighted(self, targets: Tensor, direction: Direction, part_sum) -> dict[str, Tensor]:
        """The loss dict from ``part_sum(span, rows, classes, mask)``, the summed NLL of a part's
        targets ``targets[:, span]`` as classes of the head rows ``rows`` (``head_rows``) where
        ``mask``. Start tokens and text after the first PAD are not targets; with the restricted
        head neither is a token of the other modality (which ``build_sequence`` never puts there)."""
        cfg = self.cfg
        ref, gen = ("text", "image") if direction == Direction.T2I else ("image", "text")
        part_nll = {}
        for name, part in (("ref", ref), ("gen", gen)):
            a, b = cfg.spans(direction)[part]
            span, rows = slice(a - 1, b - 1), head_rows(cfg, part)
            t = targets[:, span] - rows[0]
            mask = (t >= 0) & (t < rows[2])
            if part == "text":  # up to and including the first PAD
                is_pad = targets[:, span] == cfg.pad_id
                mask &= (is_pad.cumsum(dim=1) - is_pad.long()) == 0
            part_nll[name] = part_sum(span, rows, torch.where(mask, t, 0), mask) / mask.sum().clamp_min(1)
        total = cfg.ref_loss_weight * part_nll["ref"] + cfg.gen_loss_weight * part_nll["gen"]
        return {"loss": total, **part_nll}

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: decay on Linear weights only, none on embeddings, biases and
        LayerNorms (minGPT's rule)."""
        decay = {f"{mn}.{pn}" if mn else pn for mn, m in self.named_modules()
                 for pn, _ in m.named_parameters(recurse=False)
                 if isinstance(m, nn.Linear) and pn == "weight"}
        params = dict(self.named_parameters())
        return [{"params": [p for n, p in params.items() if n in decay], "weight_decay": weight_decay},
                {"params": [p for n, p in params.items() if n not in decay], "weight_decay": 0.0}]

    def flops_per_token(self) -> float:
        """Model FLOPs of one training token (forward + backward), PaLM appendix B: 6N for the matmul
        weights (embedding lookups excluded) + 12 * layers * width * sequence length for attention.
        The output layer counts the rows each position is scored over (``BiARTConfig.head``),
        without padding rows. MFU is this times tokens/s over the devices' peak FLOP/s."""
        c = self.cfg
        n = sum(p.numel() for name, p in self.named_parameters()
                if not name.startswith(("wte", "wpe", "wse", "lm_head")))
        if c.head == "full":
            head = c.vocab_size * (c.seq_len - 1)
        else:  # image targets over the image codes, text targets over the pieces and PAD, start tokens none
            head = c.image_vocab * c.image_len + (c.text_vocab + 1) * c.text_len
        return 6 * n + 6 * c.n_embd * head / (c.seq_len - 1) + 12 * c.n_layer * c.n_embd * c.seq_len

    @torch.no_grad()
    def generate(self, prompt: Tensor, direction: Direction, max_new_tokens: int,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True, num_samples: int = 1) -> Tensor:
        """Sample the target block of ``direction`` after a condition prompt.

        Call ``model.eval()`` first. ``temperature=0`` is greedy. Logits are computed only for the
        target modality's contiguous id range (image codes for T2I; text pieces and PAD for I2T),
        so a token of the other modality or a start token is never produced; at batch 1 this
        also spares reading most of ``lm_head`` at every step. In I2T a row stops at its first PAD
        (end-of-text) and is PAD-filled after it; generation ends when every row has stopped.

        Args:
            prompt: (B, L) the condition block with both start tokens, as ``prompt_for`` builds.
            max_new_tokens: tokens to generate (at most the target block's length).
            use_cache: reuse keys and values (the fast path); ``False`` recomputes the whole
                sequence at every step, which gives the same tokens.
            num_samples: samples per prompt; with the cache the prompt is run once and its keys
                and values are shared by its samples.
        Returns:
            (B * num_samples, max_new_tokens) generated ids, the samples of prompt i in rows
            ``i * num_samples ...``.
        """
        cfg = self.cfg
        target_len = cfg.image_len if direction == Direction.T2I else cfg.text_len
        if not 0 < max_new_tokens <= target_len:
            raise InputError(f"max_new_tokens must be in 1..{target_len} (the target block) for "
                             f"{direction.name}, got {max_new_tokens}")
        if prompt.shape[1] + target_len != cfg.seq_len:
            raise InputError(f"a {direction.name} prompt has {cfg.seq_len - target_len} tokens "
                             f"(see prompt_for), got {prompt.shape[1]}")
        text = direction == Direction.I2T
        lo, hi = (cfg.text_offset, cfg.pad_id + 1) if text else (0, cfg.image_vocab)
        head = self.lm_head.weight[lo:hi]
        cache = None
        if use_cache:
            cache = KVCache(cfg, prompt.shape[0], prompt.shape[1] + max_new_tokens, prompt.device,
                            next(self.parameters()).dtype)
        rows = prompt.shape[0] * num_samples
        seq, step_input = prompt.repeat_interleave(num_samples, dim=0), prompt
        done = torch.zeros(rows, dtype=torch.bool, device=prompt.device)
        out = []
        for step in range(max_new_tokens):
            h = self.hidden_states(step_input if use_cache else seq, direction, cache)[:, -1]
            if step == 0 and use_cache and num_samples > 1:  # the prompt ran once per prompt
                h = h.repeat_interleave(num_samples, dim=0)
                cache.repeat_interleave(num_samples)
            nxt = lo + sample_next(F.linear(h, head).float(), temperature, top_k, top_p, generator)
            if text:
                nxt = torch.where(done, torch.full_like(nxt, cfg.pad_id), nxt)
                done |= nxt == cfg.pad_id
            out.append(nxt)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            step_input = nxt[:, None]
            if text and bool(done.all()):
                break
        gen = torch.stack(out, dim=1)
        if gen.shape[1] < max_new_tokens:
            gen = F.pad(gen, (0, max_new_tokens - gen.shape[1]), value=cfg.pad_id)
        return gen


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """One token per row from (B, V) logits: greedy at temperature 0, else top-k / top-p
    (nucleus) filtered sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def build_sequence(text: Tensor, image: Tensor, direction: Direction, cfg: BiARTConfig) -> Tensor:
    """(B, text_len) text ids (BiART range, PAD-filled) and (B, image_len) codes -> (B, seq_len)."""
    B = text.shape[0]
    if text.shape[1] != cfg.text_len or image.shape[1] != cfg.image_len:
        raise InputError(f"expected {cfg.text_len} text and {cfg.image_len} image tokens, got "
                         f"{text.shape[1]} and {image.shape[1]}")
    soc = torch.full((B, 1), cfg.soc_id, dtype=torch.long, device=text.device)
    soi = torch.full((B, 1), cfg.soi_id, dtype=torch.long, device=text.device)
    text, image = text.long(), image.long()
    if direction == Direction.T2I:
        return torch.cat([soc, text, soi, image], dim=1)
    return torch.cat([soi, image, soc, text], dim=1)


def prompt_for(condition: Tensor, direction: Direction, cfg: BiARTConfig) -> Tensor:
    """Generation prompt: the condition block with its start token and the target's start token
    (T2I: text -> [SOC] text [SOI]; I2T: image codes -> [SOI] image [SOC])."""
    B = condition.shape[0]
    first, second = (cfg.soc_id, cfg.soi_id) if direction == Direction.T2I else (cfg.soi_id, cfg.soc_id)
    a = torch.full((B, 1), first, dtype=torch.long, device=condition.device)
    b = torch.full((B, 1), second, dtype=torch.long, device=condition.device)
    return torch.cat([a, condition.long(), b], dim=1)
