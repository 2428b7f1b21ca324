"""compressor.training: the schedule's values, early stopping, the optimiser's parameter groups,
seeding. Worked by hand on tiny models."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from compressor.teacher import build_teacher
from compressor.training import (
    EarlyStopping,
    autocast,
    cosine_schedule,
    device_description,
    make_optimizer,
    set_seed,
)
from tests.conftest import tiny_teacher_config


def _rates(total: int, warmup: int) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_schedule(opt, total, warmup)
    rates = []
    for _ in range(total + 2):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


def test_cosine_schedule_warms_up_linearly_then_decays_to_a_tenth():
    rates = _rates(total=14, warmup=4)
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # (step + 1) / warmup
    # after warm-up: 0.1 + 0.9 * (1 + cos(pi * progress)) / 2, progress = (step - 4) / 10
    assert rates[4] == pytest.approx(1.0) and rates[9] == pytest.approx(0.55)
    assert rates[14] == pytest.approx(0.1) and rates[15] == pytest.approx(0.1)  # held at the floor
    for step in range(4, 15):
        assert rates[step] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * (step - 4) / 10)))


def test_cosine_schedule_without_warmup_starts_at_the_peak():
    assert _rates(total=4, warmup=0)[:5] == pytest.approx([1.0, 0.8682, 0.55, 0.2318, 0.1], abs=1e-4)


def test_early_stopping_counts_rounds_without_gain():
    stop = EarlyStopping(patience=1)
    verdicts = [(stop.step(v), stop.improved) for v in (0.1, 0.2, 0.2, 0.3, 0.25, 0.25)]
    # equal is not better; stop when patience (1) is exceeded: the second round without gain
    assert verdicts == [(False, True), (False, True), (False, False), (False, True), (False, False), (True, False)]
    assert stop.best == 0.3


def test_early_stopping_on_a_loss_and_its_state_round_trip():
    stop = EarlyStopping(patience=0, higher_is_better=False)
    assert not stop.step(2.0) and not stop.step(1.5) and stop.improved
    saved = stop.state_dict()
    again = EarlyStopping(patience=0, higher_is_better=False)
    again.load_state_dict(saved)
    assert again.step(1.7) and not again.improved  # a higher loss: no gain, patience 0 is out


def test_optimizer_decays_matrices_only_and_gives_the_item_table_its_own_rate(tiny_data):
    model = build_teacher(tiny_teacher_config(), tiny_data.vocab)  # tied head: one table
    frozen = model.model.layers[0].mlp.up_proj.weight
    frozen.requires_grad_(False)
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), embedding_lr=1e-2)
    table, decay, no_decay = opt.param_groups
    assert table["params"] == [model.get_input_embeddings().weight] and table["lr"] == 1e-2
    assert decay["lr"] == no_decay["lr"] == 1e-3 and (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(grouped) == len(set(grouped)) and set(grouped) == trainable and id(frozen) not in grouped
    plain = make_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98))
    assert len(plain.param_groups) == 2  # without embedding_lr the table decays with the matrices
    assert any(p is model.get_input_embeddings().weight for p in plain.param_groups[0]["params"])
    assert plain.defaults["betas"] == (0.9, 0.98)


def test_the_same_seed_gives_the_same_draws_and_the_same_model(tiny_data):
    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    set_seed(7)
    first = draws()
    set_seed(7)
    assert draws() == first
    set_seed(8)
    assert draws() != first
    a, b = (build_teacher(tiny_teacher_config(), tiny_data.vocab, seed=3) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_cpu_autocast_follows_the_precision_decision_and_says_so():
    from compressor.training import cpu_has_native_bf16

    cpu = torch.device("cpu")
    with autocast(cpu, "fp32"):
        assert not torch.is_autocast_enabled("cpu") and (torch.ones(2) @ torch.ones(2)).dtype == torch.float32
    with autocast(cpu, "auto"):  # auto: bf16 only where this CPU has native bf16 kernels
        assert torch.is_autocast_enabled("cpu") == cpu_has_native_bf16()
    with autocast(cpu, "bf16"):  # asked for explicitly (the LLM config): bf16 autocast on a CPU too
        assert torch.is_autocast_enabled("cpu") and (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    n = torch.get_num_threads()
    assert device_description(cpu) == f"cpu ({n} thread{'' if n == 1 else 's'})"


class _LineTask:
    """y = 2x + 1 learnt by a Linear(1, 1) with noisy targets: small enough to check the loop's
    bookkeeping exactly. Every draw comes from the loop's generators (data from `rng`, the noise
    from torch's), so a resumed run must replay an uninterrupted one bit for bit."""

    def __init__(self, device, ck):
        self.net = nn.Linear(1, 1)
        self.module, self.units, self.find_unused, self.steps_per_epoch = self.net, [], False, 4
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.1)
        self.x_valid = torch.linspace(-1, 1, 9).unsqueeze(1)

    def attach(self, par):
        self.par = par

    def batches(self, epoch, rng):
        x = torch.from_numpy(rng.normal(size=(16, 1))).float()
        return [(x[i : i + 4], 2 * x[i : i + 4] + 1) for i in range(0, 16, 4)]

    def step(self, batch):
        x, y = batch
        loss = ((self.par.net(x) - y - 0.1 * torch.randn_like(y)) ** 2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"loss": loss.item()}

    def gather(self):
        pass

    def validate(self):
        with torch.no_grad():
            err = float(((self.net(self.x_valid) - 2 * self.x_valid - 1) ** 2).mean())
        return {"ndcg@10": -err}, {}

    def snapshot(self):
        return {k: v.clone() for k, v in self.net.state_dict().items()}

    def state_dict(self):
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, ck):
        self.net.load_state_dict(ck["net"])
        self.opt.load_state_dict(ck["opt"])

    def finish(self, best):
        if best is not None:
            self.net.load_state_dict(best)


def _fit(tmp_path, name, train=None, **loop):
    from compressor.teacher import TrainConfig
    from compressor.training.loop import Loop, Trainer

    train = train or TrainConfig(epochs=3, patience=5, seed=3)
    loop = Loop(checkpoint=tmp_path / name / "ck.pt", log=tmp_path / name / "log.jsonl", fingerprint={"lr": 0.1},
                required=frozenset({"net"}), progress=False, **loop)
    (tmp_path / name).mkdir(exist_ok=True)
    return Trainer(train, loop).fit(_LineTask)


def test_a_run_stopped_mid_epoch_and_resumed_replays_the_uninterrupted_run(tmp_path):
    whole = _fit(tmp_path, "whole")
    assert (whole.progress.step, whole.progress.stop_reason, len(whole.progress.history)) == (12, "epochs", 3)
    part = _fit(tmp_path, "part", max_steps=6)  # stops in the middle of the second epoch
    assert (part.progress.step, part.progress.epoch, part.progress.batch) == (6, 1, 2)
    assert part.progress.stop_reason == "step limit" and part.progress.history[0] == whole.progress.history[0] | {
        "epoch_seconds": part.progress.history[0]["epoch_seconds"]}
    resumed = _fit(tmp_path, "part")  # the step limit lifted: on to the end
    assert resumed.resumed_from_epoch == 1 and resumed.progress.stop_reason == "epochs"
    assert [h["loss"] for h in resumed.progress.history] == [h["loss"] for h in whole.progress.history]
    assert [h["valid"] for h in resumed.progress.history] == [h["valid"] for h in whole.progress.history]
    assert all(torch.equal(a, b) for a, b in zip(resumed.task.net.parameters(), whole.task.net.parameters(), strict=True))
    rows = [json.loads(x) for x in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))  # none lost, none repeated
    assert not any(r.get("final") for r in rows)  # the stopped run's closing validation is dropped


def test_the_time_cap_has_one_name_and_a_checkpoint_of_another_config_names_the_difference(tmp_path):
    from compressor.teacher import TrainConfig

    capped = TrainConfig(epochs=3, max_minutes=1e-9)
    with pytest.warns(UserWarning, match="time cap .* after 0 of 3 epochs"):
        between_steps = _fit(tmp_path, "steps", train=capped, stop_between_steps=True)
    with pytest.warns(UserWarning, match="time cap .* after 1 of 3 epochs"):
        between_epochs = _fit(tmp_path, "epochs", train=capped)
    assert between_steps.progress.stop_reason == between_epochs.progress.stop_reason == "time cap"
    assert (between_steps.progress.step, between_epochs.progress.step) == (0, 4)
    # validated once at the stop: the weights it ended with are the ones kept
    assert between_steps.progress.best_metrics and between_steps.progress.last_eval_step == 0
    from compressor.errors import CompressorError
    from compressor.training.loop import Loop, Trainer

    other = Loop(checkpoint=tmp_path / "epochs" / "ck.pt", fingerprint={"lr": 0.2}, required=frozenset({"net"}))
    with pytest.raises(CompressorError, match=r"another configuration or data \(different config: lr\)"):
        Trainer(TrainConfig(epochs=3), other).fit(_LineTask)


def test_a_checkpoint_an_older_loop_wrote_is_a_one_line_error(tmp_path):
    from compressor.errors import CompressorError

    _fit(tmp_path, "old")
    ck_path = tmp_path / "old" / "ck.pt"
    ck = torch.load(ck_path, weights_only=True)
    ck["loop"] = {"epoch": 1, "history": [], "best_metrics": {}, "stop_reason": "epochs", "elapsed": 1.0}
    torch.save(ck, ck_path)  # the teacher loop's format before the one Trainer: no data RNG state
    with pytest.raises(CompressorError, match="written by another version of this tool"):
        _fit(tmp_path, "old")
