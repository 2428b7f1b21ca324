"""Fisher information of the recommendation loss: the one place it is computed.

Everything that ranks by Fisher reads it from here:
- layer importance: the trace of the diagonal empirical Fisher per decoder layer (FISHER-LD
  eq. 3-4), from per-sample gradients of validation histories (`layer_traces`);
- pruning and low-rank factorization: a weight's diagonal Fisher (`parameter_fisher`);
- distillation: the teacher's layer traces at the start and the student's on each EMA update
  (`estimate_layer_fisher`, `grad_traces`), turned into weights by `fisher_layer_weights`.

The empirical Fisher is E[g g^T] over samples, with g one sample's gradient; its diagonal is the
mean of squared per-sample gradients. Per-sample gradients come in batches through
`torch.func.vmap(grad(...))`, exactly as a loop of batch-size-1 backward passes would give them
(tested), at a fraction of the cost. The attention mask is built as a 4-D tensor outside the
vmapped function, since transformers' own mask code branches on data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from compressor import distributed as dist
from compressor.data.protocol import RecData, Split, left_pad
from compressor.data.vocab import PAD_ID
from compressor.errors import CompressorError
from compressor.modeling import decoder_parts, item_scores, position_ids

# per-sample gradients of every chunk are held at once: cap chunk x parameters (4 bytes each, ~3 GB)
PER_SAMPLE_BUDGET = 800_000_000


# ---------------------------------------------------------------------------- probe data and loss


@dataclass
class ProbeSet:
    """Validation users as left-padded tensors: the data every Fisher estimate reads (never test)."""

    ids: torch.Tensor  # (N, T) item tokens, left-padded
    mask: torch.Tensor  # (N, T)
    targets: torch.Tensor  # (N,) validation item
    histories: list[np.ndarray]  # for excluding seen items when ranking
    split: Split

    @classmethod
    def from_split(cls, split: Split, max_len: int, samples: int | None = None, seed: int = 0) -> ProbeSet:
        sub = split if samples is None else split.subset(samples, seed)
        ids, mask = left_pad(sub.histories, max_len)
        return cls(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(sub.targets),
                   sub.histories, sub)

    @classmethod
    def from_data(cls, data: RecData, max_len: int, samples: int | None = None, seed: int = 0) -> ProbeSet:
        return cls.from_split(data.split("valid"), max_len, samples, seed)

    def __len__(self) -> int:
        return len(self.targets)

    def batch_starts(self, batch_size: int, sharded: bool = False) -> range:
        """Where each batch starts; `sharded`: this rank's batches only under torchrun (every
        world-size-th batch from its rank), so N ranks together read each batch exactly once."""
        starts = range(0, len(self), batch_size)
        return starts[dist.rank() :: dist.world_size()] if sharded else starts

    def batches(self, batch_size: int, device: torch.device | str = "cpu",
                sharded: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
        for a in self.batch_starts(batch_size, sharded):
            yield (self.ids[a : a + batch_size].to(device), self.mask[a : a + batch_size].to(device),
                   self.targets[a : a + batch_size].to(device))


def last_item_logits(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, V) next-item logits at the newest position, the padding token excluded."""
    logits = item_scores(model, ids, mask)
    logits[:, PAD_ID] = float("-inf")
    return logits


def last_item_loss(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor,
                   reduction: str = "mean") -> torch.Tensor:
    """The loss Fisher and the importance estimators measure: full-softmax cross-entropy of each
    history's held-out next item (`reduction="none"`: one loss per history)."""
    return F.cross_entropy(last_item_logits(model, ids, mask), targets, reduction=reduction)


# ---------------------------------------------------------------------------- parameters and gradients


def layer_param_groups(model: PreTrainedModel) -> list[dict[str, list[torch.nn.Parameter]]]:
    """Per decoder layer: its parameters grouped by the layer's direct child (self_attn, mlp,
    input_layernorm, ... / attn, mlp, ln_1, ...), the per-group detail of gradient estimators."""
    out = []
    for layer in decoder_parts(model).layers:
        groups: dict[str, list[torch.nn.Parameter]] = {}
        for name, p in layer.named_parameters():
            groups.setdefault(name.split(".")[0], []).append(p)
        out.append(groups)
    return out


def layer_params(model: PreTrainedModel) -> list[list[torch.nn.Parameter]]:
    """The parameters of each decoder layer, in order."""
    return [list(layer.parameters()) for layer in decoder_parts(model).layers]


@contextlib.contextmanager
def gradients_only(model: torch.nn.Module, params: Iterable[torch.nn.Parameter] | None = None):
    """Eval mode (no dropout: the scores describe the deployed function), gradients on for `params`
    only (default: the decoder layers'; an LLM's embedding gradient alone can outweigh all its
    layers'), gradients cleared before and after, every flag restored on exit."""
    everything = list(model.parameters())
    wanted = {id(p) for p in (decoder_parts(model).layers.parameters() if params is None else params)}
    was_training, flags = model.training, [p.requires_grad for p in everything]
    model.eval()
    for p in everything:
        p.requires_grad_(id(p) in wanted)
        p.grad = None
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in zip(everything, flags, strict=True):
            p.grad = None
            p.requires_grad_(flag)
        model.train(was_training)


def attention_mask_4d(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, T) additive causal + padding mask, as transformers would build it, except that a
    padded position may attend to itself (its row is otherwise empty, and its output unused)."""
    t = mask.shape[1]
    allowed = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()[None] & mask.bool()[:, None, :]
    allowed |= torch.eye(t, dtype=torch.bool, device=mask.device)[None]
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]


def _per_sample_chunk(requested: int, params: dict[str, torch.nn.Parameter]) -> int:
    n = sum(p.numel() for p in params.values())
    return max(1, min(requested, PER_SAMPLE_BUDGET // max(1, n)))


def squared_gradients(model: PreTrainedModel, probe: ProbeSet, params: dict[str, torch.nn.Parameter],
                      batch_size: int = 16, per_sample: bool = True, progress: bool = True,
                      desc: str = "fisher") -> dict[str, torch.Tensor]:
    """Mean squared gradient of the last-item loss for each of `params` (name -> tensor, fp32).

    `per_sample=True`: the diagonal empirical Fisher, mean over samples of (dL_n/dθ)², with the
    per-sample gradients computed `batch_size` at a time (capped so a chunk's gradients fit in
    memory). `per_sample=False`: mean over mini-batches of the squared gradient of the batch-mean
    loss, a cheaper and noisier estimate (what Fisher-weighted unstructured pruning has used).
    Per-sample mode differentiates parameters of the decoder body (`model.base_model`): the
    output head is applied as it is, so a tied item table's head path would be missed.

    Under torchrun each rank takes every world-size-th batch and the sums and counts are
    all-reduced: N ranks on S samples give what one process gives on the same S samples.

    Always fp32, also on a GPU with bf16: autocast under `vmap(grad(...))` is where functorch
    has known dtype bugs (pytorch#184890: normalization layers), and these scores rank layers
    against each other, where bf16's 8-bit mantissa would blur close ones."""
    device = next(model.parameters()).device
    sums = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    chunk = _per_sample_chunk(batch_size, params) if per_sample else batch_size
    body = model.base_model
    prefix = model.base_model_prefix + "."
    names = {k: k.removeprefix(prefix) for k in params}
    head = model.get_output_embeddings()

    def one_loss(theta: dict, ids, mask4d, pos, target):
        out = functional_call(body, {names[k]: v for k, v in theta.items()}, (),
                              {"input_ids": ids[None], "attention_mask": mask4d[None],
                               "position_ids": pos[None], "use_cache": False}, strict=False)
        logits = head(out.last_hidden_state[0, -1])
        logits = logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) == PAD_ID, float("-inf"))
        return F.cross_entropy(logits[None], target[None])

    per_sample_grads = vmap(grad(one_loss), in_dims=(None, 0, 0, 0, 0))
    n, rounds = 0, 0
    with gradients_only(model, params.values()):
        theta = {k: p.detach() for k, p in params.items()}
        for ids, mask, targets in tqdm(probe.batches(chunk, device, sharded=True), desc=desc,
                                       disable=not progress or not dist.is_main(), leave=False,
                                       total=len(probe.batch_starts(chunk, sharded=True))):
            if per_sample:
                mask4d = attention_mask_4d(mask, next(iter(theta.values())).dtype)
                grads = per_sample_grads(theta, ids, mask4d, position_ids(mask), targets)
                for k, g in grads.items():
                    sums[k] += g.float().pow(2).sum(0)
            else:
                loss = last_item_loss(model, ids, mask, targets)
                grads = torch.autograd.grad(loss, list(params.values()))
                for k, g in zip(params, grads, strict=True):
                    sums[k] += g.float().pow(2)
            n += len(targets)
            rounds += 1
    for s in sums.values():
        dist.all_reduce_sum(s)
    n, rounds = (int(x) for x in dist.sum_array(np.array([n, rounds])))
    denominator = n if per_sample else rounds
    return {k: s / max(1, denominator) for k, s in sums.items()}


def decoder_named_params(model: PreTrainedModel) -> list[dict[str, torch.nn.Parameter]]:
    """Per decoder layer, its parameters by their full names in `model`."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    return [{by_id[id(p)]: p for p in layer.parameters()} for layer in decoder_parts(model).layers]


@dataclass
class LayerFisher:
    """Per decoder layer, the trace of the diagonal empirical Fisher (sum over its parameters of
    E[(dL/dθ)²]) and the same split by the layer's child modules (self_attn, mlp, ...)."""

    traces: list[float]
    groups: dict[str, list[float]]
    samples: int


def layer_traces(model: PreTrainedModel, probe: ProbeSet, batch_size: int = 16,
                 progress: bool = True) -> LayerFisher:
    """tr(F_l) of every decoder layer from per-sample gradients of the last-item loss."""
    per_layer = decoder_named_params(model)
    flat = {k: p for layer in per_layer for k, p in layer.items()}
    diag = squared_gradients(model, probe, flat, batch_size, per_sample=True, progress=progress)
    traces = [sum(float(diag[k].sum()) for k in layer) for layer in per_layer]
    groups: dict[str, list[float]] = {}
    for i, layer in enumerate(decoder_parts(model).layers):
        for name, p in layer.named_parameters():
            full = next(k for k, q in per_layer[i].items() if q is p)
            groups.setdefault(name.split(".")[0], [0.0] * len(per_layer))[i] += float(diag[full].sum())
    return LayerFisher(traces, groups, len(probe))


def parameter_fisher(model: PreTrainedModel, params: list[torch.nn.Parameter], probe: ProbeSet,
                     batch_size: int = 32, per_sample: bool = False, progress: bool = True) -> list[torch.Tensor]:
    """Diagonal Fisher of each of `params`, in order (pruning's Fisher-weighted masks, low-rank's
    row weights). Default: squared mini-batch gradients (see `squared_gradients`)."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    named = {by_id[id(p)]: p for p in params}
    diag = squared_gradients(model, probe, named, batch_size, per_sample=per_sample, progress=progress,
                             desc="fisher (weights)")
    return [diag[by_id[id(p)]] for p in params]


def grad_traces(loss: torch.Tensor, groups: list[list[torch.nn.Parameter]], retain_graph: bool = False) -> np.ndarray:
    """Σ (∂loss/∂θ)² over each group of parameters: one batch's Fisher trace per layer."""
    flat = [p for g in groups for p in g]
    grads = torch.autograd.grad(loss, flat, retain_graph=retain_graph, allow_unused=True)
    out, i = [], 0
    for g in groups:
        out.append(sum(float(gr.pow(2).sum()) for gr in grads[i : i + len(g)] if gr is not None))
        i += len(g)
    return np.asarray(out, dtype=np.float64)


def estimate_layer_fisher(model: PreTrainedModel, batches: Iterable, loss_fn: Callable) -> np.ndarray:
    """Mean per-layer trace of squared batch gradients of `loss_fn(model, *batch)` over `batches`
    (distillation's starting weights when no importance file is given). Under torchrun each rank
    takes every world-size-th batch; the sums are all-reduced (same result as one process)."""
    groups = layer_params(model)
    total, n = np.zeros(len(groups)), 0
    with gradients_only(model, [p for g in groups for p in g]):
        for batch in list(batches)[dist.rank() :: dist.world_size()]:
            total += grad_traces(loss_fn(model, *batch), groups)
            n += 1
    total = dist.sum_array(total)
    n = int(dist.sum_array(np.array([n]))[0])
    if n == 0:
        raise CompressorError("no batches to estimate the Fisher information from")
    return total / n


# ---------------------------------------------------------------------------- from traces to weights


def normalise(scores) -> np.ndarray:
    """Scores -> weights summing to 1; negatives clipped to 0; all-zero or non-finite -> uniform."""
    s = np.clip(np.asarray(scores, dtype=np.float64), 0, None)
    total = s.sum()
    if not np.isfinite(total) or total <= 0:
        return np.full(len(s), 1.0 / len(s))
    return s / total


def depth_bias_factors(layers, num_layers: int, beta: float, delta: float = 1.0) -> np.ndarray:
    """(1 + beta * l / L)^delta for the given 0-based layer indices, l counted from 1 (FISHER-LD eq. 6)."""
    return (1 + beta * (np.asarray(layers, dtype=np.float64) + 1) / num_layers) ** delta


def fisher_layer_weights(traces, gamma: float = 1.0, depth_bias: bool = False, beta: float = 0.3,
                         delta: float = 1.0) -> list[float]:
    """FISHER-LD eq. 5-6: w_l = tr(F_l) / Σ tr(F) · gamma, then, with `depth_bias`,
    w_l · (1 + beta · l / L)^delta with l = 1..L."""
    w = normalise(traces) * gamma
    if depth_bias:
        w = w * depth_bias_factors(range(len(w)), len(w), beta, delta)
    return w.tolist()
