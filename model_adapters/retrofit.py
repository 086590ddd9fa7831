"""Retrofit a full-attention Llama-family checkpoint to NSA by distillation (`nsa-eval retrofit`).

The student is the base model with NSA attention (paper eq. 5) over the layer's own q/k/v, one shared K/V (as
flash-linear-attention's NSA): mean-pooled blocks of `block` tokens (compression), the top `selected` blocks by the
compressed scores (selection), the last `window` tokens, mixed by gates sigmoid(g_proj(x)) [HQ, 3] per query head.
The base stays frozen and is the teacher (its own full attention). What trains, and is all that ships:
- g_proj of every layer (new; at the start fitted on one batch so the gates sit near recipe.gate_init, see
  fit_gates: zero weights give 0.5 each, a sum of 1.5, and on SmolLM2 a first distill KL of 3.4 nats instead of
  0.12 at 1.5k tokens). The default starts on the selected branch (0.02, 0.96, 0.02): with 16 blocks of 64 it is
  exactly full attention up to 1k tokens, while the window branch lacks the attention sink (token 0), and mixing
  it in at 0.49 cost SmolLM2 its needle retrieval (results/smollm2-nsa-vs-full/README.md);
- low-rank updates W + B A (rank r, LoRA; B zero at the start) of q_proj and k_proj (stage 1) and of q, k, v and
  o_proj (stage 2). They are merged into the weights when the NSA checkpoint is built (retrofit_file.build_checkpoint).

Losses, per token and averaged:
- distill: KL(teacher's next-token distribution || student's), temperature 1;
- mass: per layer and KV head, at `probes` random query positions past the first `selected` blocks, KL(the dense
  attention's probability mass per complete block || the compressed branch's block probabilities), both averaged
  over the query heads of the group (eq. 10's group sum): this is what teaches selection, since the top-n pick has
  no gradient. The dense side uses the frozen base q/k on the student's own layer input (as DeepSeek-V3.2's dense
  warm-up trains its indexer against the main attention).
Stage 1 (warm-up, `warmup_steps`): distill + mass, gates and q/k low-rank updates. Stage 2 (`steps`): the same
losses, every low-rank update and the gates. Data: windows of `seq_len` tokens of the corpus
(model_adapters/retrofit_corpus.py) at offsets drawn from (seed, step), so a resumed run sees the same batches.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nsa_eval.kernels.nsa import NSALayout, mean_pool, nsa_attention
from nsa_eval.model_adapters.runtime.config import ModelConfig
from nsa_eval.model_adapters.runtime.model import Transformer
from nsa_eval.model_adapters.runtime.ops import rms_norm
from nsa_eval.model_adapters.runtime.rope import rope_tables

STAGE1_PROJECTIONS = ("q", "k")
STAGE2_PROJECTIONS = ("q", "k", "v", "o")


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a retrofit's result (recorded with it)."""

    base: str = "smollm2"
    block: int = 64          # l = d = l' (flash-linear-attention's layout)
    selected: int = 16       # n
    window: int = 512        # w
    lora_rank: int = 16
    seq_len: int = 4096
    batch: int = 1           # sequences per step
    warmup_steps: int = 100
    steps: int = 400
    lr: float = 1e-3         # low-rank updates
    gate_lr: float = 3e-3
    mass_weight: float = 1.0
    probes: int = 256        # query positions per sequence for the mass loss
    seed: int = 0
    gate_init: str = "0.02,0.96,0.02"  # gates at the start (compressed,selected,window) by fit_gates, or "zero"

    def check(self) -> None:
        for name in ("block", "selected", "lora_rank", "seq_len", "batch", "probes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"retrofit: --{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.warmup_steps < 0 or self.steps < 0 or self.warmup_steps + self.steps < 1:
            raise ValueError("retrofit: --warmup-steps and --steps must be >= 0 with at least one step in all")
        if self.window < 0:
            raise ValueError(f"retrofit: --window must be >= 0, got {self.window}")
        if self.gate_init != "zero":
            try:
                targets = self.gate_targets
            except ValueError:  # not numbers
                targets = ()
            if len(targets) != 3 or not all(0 < t < 1 for t in targets):
                raise ValueError(f"retrofit: --gate-init {self.gate_init!r}: give 'zero' or three gates in (0, 1) for "
                                 "compressed,selected,window, e.g. 0.02,0.96,0.02")
        if self.seq_len <= self.block * self.selected:
            raise ValueError(f"retrofit: --seq-len {self.seq_len} must exceed block x selected = "
                             f"{self.block * self.selected} tokens, or selection never drops a block")

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.steps

    @property
    def gate_targets(self) -> tuple[float, ...]:
        """gate_init as (compressed, selected, window); () for 'zero'."""
        return () if self.gate_init == "zero" else tuple(float(t) for t in self.gate_init.split(","))

    @classmethod
    def from_record(cls, recipe: dict) -> "Recipe":
        """The recipe a retrofit file records. Files made before gate_init existed: gate_fit True meant targets
        0.02,0.49,0.49 (the first GPU retrofit), no key meant zero gates."""
        recipe = dict(recipe)
        if "gate_init" not in recipe:
            recipe["gate_init"] = "0.02,0.49,0.49" if recipe.pop("gate_fit", False) else "zero"
        return cls(**recipe)


def delta_bytes(config: ModelConfig, recipe: Recipe) -> int:
    """Bytes of the shipped file's tensors (float16): the gates and the low-rank factors of q, k, v, o per layer."""
    hidden, hq, h, d, r = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                           config.head_dim, recipe.lora_rank)
    per_layer = hq * 3 * hidden + r * ((hidden + hq * d) * 2 + (hidden + h * d) * 2)
    return 2 * per_layer * config.num_hidden_layers


def nsa_config(base: ModelConfig, recipe: Recipe) -> ModelConfig:
    """The student's config: the base's shape with NSA attention over one shared K/V and mean pooling."""
    if base.attention != "full":
        raise ValueError(f"retrofit needs a full-attention base model; this one has attention {base.attention!r}")
    if base.qk_norm or base.sliding_window or base.head_dim != base.v_head_dim:
        raise ValueError("retrofit supports Llama-style bases (no q/k norm, no sliding window, equal q/k and v head "
                         "dims)")
    fields = {k: v for k, v in base.to_dict().items() if k not in ("model_type", "architectures", "sparse")}
    return ModelConfig(**{**fields, "attention": "nsa", "shared_kv": True, "compression": "mean",
                          "block_len": recipe.block, "block_stride": recipe.block, "select_len": recipe.block,
                          "num_selected": recipe.selected, "window": recipe.window})


class LowRank(nn.Module):
    """W + scale * B A for a frozen Linear W [out, in]: A [r, in] (Kaiming-uniform), B [out, r] (zero)."""

    def __init__(self, linear: nn.Linear, rank: int, generator: torch.Generator):
        super().__init__()
        out_dim, in_dim = linear.weight.shape
        bound = 1.0 / math.sqrt(in_dim)
        self.a = nn.Parameter((torch.rand(rank, in_dim, generator=generator) * 2 - 1) * bound)
        self.b = nn.Parameter(torch.zeros(out_dim, rank))

    def delta(self) -> torch.Tensor:
        """B A [out, in], float32."""
        return self.b.float() @ self.a.float()


class Retrofit(nn.Module):
    """The student over a frozen base (module docstring). model: a Transformer of nsa_config(...) holding the base
    weights (its g_proj is trained); low_rank: 'layer.proj' -> LowRank."""

    def __init__(self, model: Transformer, recipe: Recipe):
        super().__init__()
        self.model, self.recipe, self.config = model, recipe, model.config
        self.fixed_gates: tuple[float, float, float] | None = None  # set for an ablation (gate_probe.py)
        for p in model.parameters():
            p.requires_grad_(False)
        generator = torch.Generator().manual_seed(recipe.seed)
        self.low_rank = nn.ModuleDict()
        for i, layer in enumerate(model.layers):
            for proj in STAGE2_PROJECTIONS:
                linear = getattr(layer.attn, f"{proj}_proj")
                self.low_rank[f"{i}_{proj}"] = LowRank(linear, recipe.lora_rank, generator).to(linear.weight.device)
            layer.attn.g_proj.weight = nn.Parameter(torch.zeros_like(layer.attn.g_proj.weight, dtype=torch.float32))

    def gates(self) -> list[nn.Parameter]:
        return [layer.attn.g_proj.weight for layer in self.model.layers]

    def trainable(self, stage: int) -> dict[str, list[nn.Parameter]]:
        """The parameter groups a stage trains: {'gates': [...], 'low_rank': [...]}."""
        projections = STAGE1_PROJECTIONS if stage == 1 else STAGE2_PROJECTIONS
        low_rank = [p for key, m in self.low_rank.items() if key.split("_")[1] in projections for p in m.parameters()]
        return {"gates": self.gates(), "low_rank": low_rank}

    # ---- forward -------------------------------------------------------------------------------------------

    def _linear(self, i: int, proj: str, x: torch.Tensor, adapted: bool) -> torch.Tensor:
        weight = getattr(self.model.layers[i].attn, f"{proj}_proj").weight
        y = F.linear(x, weight)
        if adapted:
            lr = self.low_rank[f"{i}_{proj}"]
            y = y + F.linear(F.linear(x, lr.a.to(x.dtype)), lr.b.to(x.dtype))
        return y

    def forward(self, ids: torch.Tensor, student: bool = True, probes: torch.Tensor | None = None,
                layer_inputs: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, T] -> (logits [B, T, V] in the model's dtype, mass loss (0-dim float32; 0 without probes)).
        student False: the frozen base with full attention (the teacher). probes [P] long: query positions for the
        mass loss. layer_inputs: a list that receives each layer's normalised attention input [B, T, hidden]."""
        c, m = self.config, self.model
        B, T = ids.shape
        cos, sin = rope_tables(torch.arange(T, device=ids.device).expand(B, T), m.inv_freq, m.rope_scale)
        h = m.embed(ids)
        mass = torch.zeros((), device=ids.device)
        for i, layer in enumerate(m.layers):
            x = rms_norm(h, layer.attn_norm.weight, c.rms_norm_eps)
            if layer_inputs is not None:
                layer_inputs.append(x.detach())
            o, layer_mass = self._attention(i, x, cos, sin, student, probes)
            h = h + o
            mass = mass + layer_mass
            x = rms_norm(h, layer.mlp_norm.weight, c.rms_norm_eps)
            mlp = layer.mlp
            h = h + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        logits = m.lm_head(rms_norm(h, m.norm.weight, c.rms_norm_eps))
        return logits, mass / len(m.layers)

    def _attention(self, i, x, cos, sin, student: bool, probes):
        c, attn = self.config, self.model.layers[i].attn
        B, T, _ = x.shape
        hq, h, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = rotate(self._linear(i, "q", x, student).view(B, T, hq, d), cos, sin)
        k = rotate(self._linear(i, "k", x, student).view(B, T, h, d), cos, sin)
        v = self._linear(i, "v", x, student).view(B, T, h, d)
        mass = torch.zeros((), device=x.device)
        if not student:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=True).transpose(1, 2)
        else:
            gates = torch.sigmoid(F.linear(x, attn.g_proj.weight.to(x.dtype))).view(B, T, hq, 3)
            if self.fixed_gates is not None:  # an ablation: every query's gates set to (compressed, selected, window)
                gates = torch.tensor(self.fixed_gates, dtype=gates.dtype, device=gates.device).expand_as(gates)
            k_cmp, v_cmp = mean_pool(k, c.block_len), mean_pool(v, c.block_len)
            attend = nsa_attention if q.is_cuda else nsa_attention_sdpa  # Triton on CUDA, masked SDPA on the CPU
            o = attend(q, k, v, k_cmp, v_cmp, gates[..., 0], gates[..., 1], gates[..., 2] if c.window else None,
                       layout=c.layout)
            if probes is not None:
                with torch.no_grad():
                    q_base = rotate(F.linear(x, attn.q_proj.weight).view(B, T, hq, d), cos, sin)
                    k_base = rotate(F.linear(x, attn.k_proj.weight).view(B, T, h, d), cos, sin)
                mass = block_mass_kl(q[:, probes], k_cmp, q_base[:, probes], k_base, probes, c.block_len)
        return self._linear(i, "o", o.reshape(B, T, hq * d), student), mass


def fit_gates(retrofit: Retrofit, ids: torch.Tensor, targets: tuple[float, float, float]) -> list[float]:
    """Set every layer's g_proj so the gates start near `targets` (compressed, selected, window; each in (0, 1)) on
    real text: per layer, the direction u [hidden] with x u ~= 1 over the teacher's attention inputs x of ids [B, T]
    (ridge least squares; normalised hidden states share a large constant component), then row (head, branch) =
    logit(target of branch) * u. Zero gates give 0.5 each, a sum of 1.5 that scales every attention output by half
    again at the start. Returns each layer's mean gate sum on ids after the fit."""
    inputs: list[torch.Tensor] = []
    with torch.no_grad():
        retrofit(ids, student=False, layer_inputs=inputs)
        logits = torch.tensor([math.log(t / (1 - t)) for t in targets])
        sums = []
        for layer, x in zip(retrofit.model.layers, inputs):
            X = x.reshape(-1, x.shape[-1]).float()
            gram = X.T @ X + 1e-3 * X.shape[0] * torch.eye(X.shape[1], device=X.device)
            u = torch.linalg.solve(gram, X.T @ torch.ones(X.shape[0], device=X.device))
            weight = layer.attn.g_proj.weight
            rows = logits.to(u.device)[None, :, None] * u[None, None, :]  # [1, 3, hidden]
            weight.copy_(rows.expand(weight.shape[0] // 3, 3, -1).reshape_as(weight))
            sums.append(round(float(torch.sigmoid(X @ weight.float().T).view(X.shape[0], -1, 3).sum(-1).mean()), 3))
    return sums


def nsa_attention_sdpa(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win=None, *, layout: NSALayout):
    """The CPU training path of NSA's prefill (T == S): the reference's compressed branch and selection
    (kernels/nsa/reference.py), the selected and window branches as PyTorch SDPA with boolean masks (its fused CPU
    kernel instead of the reference's dense float32 softmax: several times faster forward and backward). Same
    arguments and result as nsa_attention: q [B, T, HQ, D], k, v [B, T, H, D], k_cmp, v_cmp [B, Tc, H, D], gates
    [B, T, HQ] -> o [B, T, HQ, D] (tests/model_adapters/test_retrofit.py checks values and gradients)."""
    from nsa_eval.kernels.nsa.reference import _compressed, _select
    from nsa_eval.kernels.nsa.utils import query_positions

    B, T, HQ, D = q.shape
    H = k.shape[2]
    scale = 1.0 / math.sqrt(D)
    positions = query_positions(q, T)
    select_len, window = layout.select_len, layout.window
    o_cmp, lse = _compressed(q, k_cmp, v_cmp, positions, layout, scale)
    with torch.no_grad():
        indices = _select(q.detach(), k_cmp.detach(), lse.detach(), positions, T, layout, scale)  # [B, T, H, n]
        num_slc = -(-T // select_len)
        chosen = torch.zeros(B, T, H, num_slc + 1, dtype=torch.bool, device=q.device)
        chosen.scatter_(-1, torch.where(indices >= 0, indices, num_slc).long(), True)
        s = torch.arange(T, device=q.device)
        causal = s[None, :] <= s[:, None]  # [T, S]
        selected = (chosen[..., s // select_len] & causal[None, :, None]).permute(0, 2, 1, 3)  # [B, H, T, S]
        selected = selected.repeat_interleave(HQ // H, dim=1)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    o_slc = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=selected, scale=scale, enable_gqa=True)
    out = g_cmp.float().unsqueeze(-1) * o_cmp + g_slc.float().unsqueeze(-1) * o_slc.transpose(1, 2).float()
    if window:
        band = causal & (s[None, :] > s[:, None] - window)
        o_win = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=band, scale=scale, enable_gqa=True)
        out = out + g_win.float().unsqueeze(-1) * o_win.transpose(1, 2).float()
    return out.to(q.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE, out of place (differentiable): x [B, T, R, D], cos/sin [B, T, 1, D/2] -> x's dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def block_mass_kl(q: torch.Tensor, k_cmp: torch.Tensor, q_dense: torch.Tensor, k_dense: torch.Tensor,
                  positions: torch.Tensor, block: int) -> torch.Tensor:
    """KL(dense attention's mass per complete block || compressed-branch block probabilities), both averaged over the
    query heads of each KV head, mean over (batch, probe, KV head); float32 0-dim.
    q [B, P, HQ, D] (student, at `positions` [P]), k_cmp [B, Nc, H, D] (mean-pooled student keys), q_dense [B, P, HQ,
    D] and k_dense [B, T, H, D] (the frozen base's), block: tokens per compressed block (l = d)."""
    B, P, HQ, D = q.shape
    H, Nc = k_cmp.shape[2], k_cmp.shape[1]
    G, scale = HQ // H, 1.0 / math.sqrt(D)
    visible = torch.arange(Nc, device=q.device)[None, :] < ((positions + 1) // block)[:, None]  # [P, Nc]
    scores = torch.einsum("bphgd,bchd->bphgc", q.float().view(B, P, H, G, D), k_cmp.float()) * scale
    scores = scores.masked_fill(~visible[None, :, None, None], float("-inf"))
    log_student = torch.log_softmax(scores, -1).exp().mean(3).clamp_min(1e-12).log()  # [B, P, H, Nc]
    with torch.no_grad():
        T = k_dense.shape[1]
        dense = torch.einsum("bphgd,bthd->bphgt", q_dense.float().view(B, P, H, G, D), k_dense.float()) * scale
        causal = torch.arange(T, device=q.device)[None, :] <= positions[:, None]  # [P, T]
        probs = torch.softmax(dense.masked_fill(~causal[None, :, None, None], float("-inf")), -1)
        mass = probs[..., :Nc * block].reshape(B, P, H, G, Nc, block).sum(-1).mean(3)  # [B, P, H, Nc]
        mass = mass * visible[None, :, None]
        target = mass / mass.sum(-1, keepdim=True).clamp_min(1e-12)
    kl = (target * (target.clamp_min(1e-12).log() - log_student)).masked_fill(~visible[None, :, None], 0).sum(-1)
    return kl.mean()


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Mean over tokens of KL(softmax(teacher) || softmax(student)); logits [B, T, V]; float32, in chunks of
    positions to bound the float32 copies."""
    B, T, V = student_logits.shape
    s, t = student_logits.reshape(B * T, V), teacher_logits.reshape(B * T, V)
    total = student_logits.new_zeros((), dtype=torch.float32)
    for a in range(0, B * T, chunk):
        log_t = torch.log_softmax(t[a:a + chunk].float(), -1)
        log_s = torch.log_softmax(s[a:a + chunk].float(), -1)
        total = total + (log_t.exp() * (log_t - log_s)).sum()
    return total / (B * T)


# ---- the training loop --------------------------------------------------------------------------------------

@dataclass
class Progress:
    step: int = 0
    seconds: float = 0.0
    log: list[dict] = field(default_factory=list)


def batch_at(corpus_ids: np.ndarray, recipe: Recipe, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's sequences [batch, seq_len] and probe positions [probes] (drawn from (seed, step) alone)."""
    rng = np.random.default_rng([recipe.seed, step])
    top = corpus_ids.size - recipe.seq_len
    if top < 1:
        raise ValueError(f"the corpus holds {corpus_ids.size} tokens, fewer than --seq-len {recipe.seq_len}")
    starts = rng.integers(0, top, size=recipe.batch)
    ids = np.stack([corpus_ids[s:s + recipe.seq_len] for s in starts])
    low = recipe.block * (recipe.selected + 1)
    probes = np.sort(rng.choice(np.arange(low, recipe.seq_len), size=min(recipe.probes, recipe.seq_len - low),
                                replace=False))
    return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(probes.astype(np.int64))


def optimizer_for(retrofit: Retrofit, stage: int) -> torch.optim.Optimizer:
    groups = retrofit.trainable(stage)
    return torch.optim.AdamW([{"params": groups["gates"], "lr": retrofit.recipe.gate_lr},
                              {"params": groups["low_rank"], "lr": retrofit.recipe.lr}], weight_decay=0.0)


def learning_rate_factor(recipe: Recipe, step: int) -> float:
    """Linear warm-up over the first 5% of each stage, then cosine to 10% within the stage."""
    first, length = (0, recipe.warmup_steps) if step < recipe.warmup_steps else (recipe.warmup_steps, recipe.steps)
    at = step - first
    warm = max(1, length // 20)
    if at < warm:
        return (at + 1) / warm
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (at - warm) / max(1, length - warm)))


def train(retrofit: Retrofit, corpus_ids: np.ndarray, state_path: Path, progress: Progress,
          on_step: Callable[[dict], None], save_every: int = 50, optimizer_state: dict | None = None) -> Progress:
    """Run the steps from progress.step to recipe.total_steps; save the resumable state to state_path every
    save_every steps and at the end. on_step(record) after each step."""
    recipe, device = retrofit.recipe, retrofit.model.device
    stage = 1 if progress.step < recipe.warmup_steps else 2
    optimizer = optimizer_for(retrofit, stage)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    while progress.step < recipe.total_steps:
        step = progress.step
        if step == recipe.warmup_steps and stage == 1:
            stage, optimizer = 2, optimizer_for(retrofit, 2)
        started = time.perf_counter()
        ids, probes = batch_at(corpus_ids, recipe, step)
        ids, probes = ids.to(device), probes.to(device)
        factor = learning_rate_factor(recipe, step)
        for group, base_lr in zip(optimizer.param_groups, (recipe.gate_lr, recipe.lr)):
            group["lr"] = base_lr * factor
        with torch.no_grad():
            teacher, _ = retrofit(ids, student=False)
        logits, mass = retrofit(ids, student=True, probes=probes)
        distill = distill_kl(logits, teacher)
        loss = distill + recipe.mass_weight * mass
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        progress.step += 1
        progress.seconds += seconds
        record = {"step": progress.step, "stage": stage, "loss": loss.item(), "distill_kl": distill.item(),
                  "mass_kl": mass.item(), "lr_factor": round(factor, 4), "seconds": round(seconds, 4),
                  "tokens_per_s": round(ids.numel() / seconds, 1)}
        progress.log.append(record)
        on_step(record)
        if progress.step % save_every == 0 or progress.step == recipe.total_steps:
            save_state(retrofit, optimizer, progress, state_path)
    return progress


def save_state(retrofit: Retrofit, optimizer: torch.optim.Optimizer, progress: Progress, path: Path) -> None:
    """The resumable state (trainable tensors, optimizer, step, log), written atomically."""
    state = {"recipe": asdict(retrofit.recipe), "trained": trained_tensors(retrofit), "optimizer": optimizer.state_dict(),
             "step": progress.step, "seconds": progress.seconds, "log": progress.log}
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    partial.replace(path)


def load_state(retrofit: Retrofit, path: Path) -> tuple[Progress, dict]:
    """Restore a save_state file into retrofit -> (progress, the optimizer's state); ValueError if its recipe differs."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["recipe"] != asdict(retrofit.recipe):
        changed = sorted(k for k in state["recipe"] if state["recipe"][k] != asdict(retrofit.recipe).get(k))
        raise ValueError(f"{path} is a retrofit with other settings ({', '.join(changed)}); give another --out or the "
                         "same settings")
    load_trained(retrofit, state["trained"])
    return Progress(state["step"], state["seconds"], state["log"]), state["optimizer"]


def trained_tensors(retrofit: Retrofit) -> dict[str, torch.Tensor]:
    """What training changed, by name: layers.i.attn.g_proj.weight and layers.i.attn.{q,k,v,o}_proj.lora_{a,b}."""
    out = {}
    for i, layer in enumerate(retrofit.model.layers):
        out[f"layers.{i}.attn.g_proj.weight"] = layer.attn.g_proj.weight.detach().float().cpu()
        for proj in STAGE2_PROJECTIONS:
            lr = retrofit.low_rank[f"{i}_{proj}"]
            out[f"layers.{i}.attn.{proj}_proj.lora_a"] = lr.a.detach().float().cpu()
            out[f"layers.{i}.attn.{proj}_proj.lora_b"] = lr.b.detach().float().cpu()
    return out


def load_trained(retrofit: Retrofit, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for i, layer in enumerate(retrofit.model.layers):
            layer.attn.g_proj.weight.copy_(tensors[f"layers.{i}.attn.g_proj.weight"])
            for proj in STAGE2_PROJECTIONS:
                lr = retrofit.low_rank[f"{i}_{proj}"]
                lr.a.copy_(tensors[f"layers.{i}.attn.{proj}_proj.lora_a"])
                lr.b.copy_(tensors[f"layers.{i}.attn.{proj}_proj.lora_b"])


def student_from_base(base: Transformer, recipe: Recipe, device: str | torch.device | None = None,
                      dtype: torch.dtype | None = None) -> Retrofit:
    """A Retrofit whose model is the base's weights under nsa_config (gates zero, low-rank updates zero), on
    `device` in `dtype` (default: the base's); the base itself is left as it is."""
    config = nsa_config(base.config, recipe)
    model = Transformer(config).to(device=device or base.device, dtype=dtype or base.dtype)
    state = dict(base.state_dict())
    missing = model.load_state_dict(state, strict=False).missing_keys
    if any(not key.endswith("g_proj.weight") for key in missing):
        raise ValueError(f"the base's weights do not fit the NSA student: missing {missing[:3]}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    return Retrofit(model, recipe)
