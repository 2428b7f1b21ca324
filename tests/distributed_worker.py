"""Checks that need several real processes, run by tests/test_distributed.py under torchrun:

    torchrun --standalone --nproc_per_node 2 -m tests.distributed_worker OUT_JSON TEACHER_DIR
    torchrun --standalone --nproc_per_node 2 -m tests.distributed_worker distill OUT_JSON TEACHER STUDENT DATA OUT

Every rank computes; rank 0 writes OUT_JSON, which the test compares with one process's answers.
Not a test module itself (pytest collects test_*.py only).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from compressor import distributed as dist
from compressor.data import prepare
from compressor.data.protocol import training_windows, window_batches
from compressor.distill import DistillConfig, distill_dirs
from compressor.errors import CompressorError
from compressor.fisher import ProbeSet, estimate_layer_fisher, layer_traces, parameter_fisher
from compressor.modeling import decoder_parts, load_model
from compressor.sampled_softmax import SampledNextItemLoss, train_proposal
from compressor.teacher import NextItemLoss, build_teacher
from compressor.training import make_optimizer
from tests.conftest import tiny_interactions, tiny_teacher_config

PROBE_SAMPLES, BATCH = 37, 8  # 37 = an uneven split over 2 ranks and 5 batches, the last one short


def fisher_values(teacher_dir: str) -> dict:
    """The three Fisher estimates the stages use, on fixed samples (shared with the test)."""
    model, vocab = load_model(teacher_dir)
    data = prepare(tiny_interactions(), vocab=vocab)
    probe = ProbeSet.from_data(data, 20, samples=PROBE_SAMPLES)
    traces = layer_traces(model, probe, batch_size=BATCH, progress=False)
    first = list(decoder_parts(model).layers[0].parameters())
    weights = parameter_fisher(model, first, probe, batch_size=BATCH, progress=False)
    batches = [b for b in probe.batches(BATCH)]
    layer = estimate_layer_fisher(model, [(ids, mask, targets) for ids, mask, targets in batches],
                                  lambda m, ids, mask, t: torch.nn.functional.cross_entropy(
                                      m(input_ids=ids, attention_mask=mask).logits[:, -1], t))
    return {"traces": traces.traces, "groups": traces.groups, "samples": traces.samples,
            "weights": [w.flatten().tolist() for w in weights], "layer": layer.tolist()}


def fsdp_round_trip() -> dict:
    """Train 2 steps under FSDP, save the whole state in the plain formats, restore it into a
    fresh sharded model, and take one more step on both: the states must agree exactly."""
    data = prepare(tiny_interactions(30))
    cfg = tiny_teacher_config(num_layers=2)
    windows = training_windows(data.train_sequences(), 20)
    mine = [windows[i] for i in dist.shard(np.arange(len(windows)))]
    batches = [tuple(torch.from_numpy(x) for x in b) for b in window_batches(mine, 20, 16, None)][:3]

    def fresh():
        model = build_teacher(cfg, data.vocab, seed=0)
        par = dist.Parallel(NextItemLoss(model), "fsdp", units=list(decoder_parts(model).layers))
        return model, par, make_optimizer(model, 1e-2, 0.1, (0.9, 0.98))

    def step(par, opt, batch):
        opt.zero_grad(set_to_none=True)
        par.net(*batch).backward()
        opt.step()

    model_a, par_a, opt_a = fresh()
    for b in batches[:2]:
        step(par_a, opt_a, b)
    saved = dist.broadcast_object((par_a.full_state(), par_a.optimizer_state(opt_a)))
    weights = {k.removeprefix("model."): v.clone() for k, v in saved[0].items()}
    model_b, par_b, opt_b = fresh()
    par_b.load_full_state(dict(saved[0]))  # (it replaces the dict's values by the rank's shards)
    par_b.load_optimizer_state(opt_b, saved[1])
    step(par_a, opt_a, batches[2])
    step(par_b, opt_b, batches[2])
    a, b = par_a.full_state(), par_b.full_state()
    out = {"sharded": type(next(model_a.parameters())).__name__ == "DTensor"}
    if dist.is_main():
        out["states_equal"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        # the saved optimizer state is the plain format: one process's AdamW loads it
        plain = build_teacher(cfg, data.vocab, seed=0)
        plain.load_state_dict(weights)
        opt = make_optimizer(plain, 1e-2, 0.1, (0.9, 0.98))
        opt.load_state_dict(saved[1])
        out["plain_optimizer_loads"] = all(
            opt.state[p]["exp_avg"].shape == p.shape for g in opt.param_groups for p in g["params"])
    return out


def sampled_ddp() -> dict:
    """3 DDP steps of the teacher's sampled-softmax loss, each rank on its shard of the windows and
    drawing its own negatives from the torch RNG seeded seed + rank (as `training.Trainer` seeds
    it): the ranks' draws differ, their weights stay equal (DDP all-reduces the gradients of the
    item rows each rank touched), every loss is finite."""
    data = prepare(tiny_interactions(30))
    model = build_teacher(tiny_teacher_config(num_layers=2), data.vocab, seed=0)
    torch.manual_seed(0 + dist.rank())
    q = train_proposal(data.train_sequences(), data.vocab.size, 0.75)
    draws, sample = [], q.sample
    q.sample = lambda k, generator=None: draws.append(sample(k, generator)) or draws[-1]
    par = dist.Parallel(SampledNextItemLoss(model, q, 32), "ddp")
    opt = make_optimizer(model, 1e-2, 0.1, (0.9, 0.98))
    windows = training_windows(data.train_sequences(), 20)
    mine = [windows[i] for i in dist.shard(np.arange(len(windows)))]
    losses = []
    for b in [tuple(torch.from_numpy(x) for x in b) for b in window_batches(mine, 20, 16, None)][:3]:
        opt.zero_grad(set_to_none=True)
        loss = par.net(*b)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"negatives": dist.all_gather_object([d.tolist() for d in draws]), "losses": dist.all_gather_object(losses),
            "weights": dist.all_gather_object([float(p.double().sum()) for p in model.parameters()])}


def helpers() -> dict:
    order = np.arange(11) * 10
    out = {"shards": dist.all_gather_object(dist.shard(order).tolist()),
           "splits": dist.all_gather_object((dist.split(11).start, dist.split(11).stop)),
           "sum": dist.sum_array(np.array([dist.rank() + 1.0])).tolist()}

    def fail():
        raise ValueError("boom on rank 0")

    try:
        dist.on_main(fail)
    except (CompressorError, ValueError) as e:
        out["errors"] = dist.all_gather_object(f"{type(e).__name__}: {e}")
    # inside on_main rank 0 acts alone: a sharded helper must not wait for the others
    out["alone"] = dist.on_main(lambda: (dist.world_size(), dist.sum_array(np.array([5.0])).tolist()))
    return out


def candidate_distill(teacher_dir: str, student_dir: str, data_dir: str, out_dir: str) -> dict:
    """distill.output=candidates as the pipeline runs it under torchrun (`compressor distill` is
    one process only): fisher_ld, the teacher's Fisher estimated on the fly with the sampled loss."""
    cfg = DistillConfig(method="fisher_ld", output="candidates", candidates_topk=20, candidates_negatives=64,
                        train={"epochs": 2, "batch_size": 32})
    r = distill_dirs(teacher_dir, student_dir, lambda vocab: prepare(data_dir, vocab=vocab), cfg, out_dir, progress=False)
    # every rank ends with the student rank 0 kept (broadcast): a checksum per rank
    return {"world_size": r.world_size, "steps": r.steps,
            "students": dist.all_gather_object([float(p.double().sum()) for p in r.model.parameters()])}


def main() -> None:
    if sys.argv[1] == "distill":  # ... distill OUT_JSON TEACHER_DIR STUDENT_DIR DATA_DIR OUT_DIR
        with dist.session("distributed_worker", True):
            result = candidate_distill(*sys.argv[3:7])
            if dist.is_main():
                with open(sys.argv[2], "w") as f:
                    json.dump(result, f)
        return
    out, teacher_dir = sys.argv[1], sys.argv[2]
    with dist.session("distributed_worker", True):
        result = {"world_size": dist.world_size(), "helpers": helpers(), "fisher": fisher_values(teacher_dir),
                  "fsdp": fsdp_round_trip(), "sampled": sampled_ddp()}
        if dist.is_main():
            with open(out, "w") as f:
                json.dump(result, f)


if __name__ == "__main__":
    main()
