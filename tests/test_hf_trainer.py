"""samlm.integrations.hf.SAMTrainer: Hugging Face Trainer with SAM-family steps, on tiny GPT-2s built from configs."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, TrainingArguments
from transformers.utils import logging as hf_logging

import samlm
from samlm.integrations.hf import SAMTrainer, TrainerOptimizer, _refuse_deepspeed, head_kind

hf_logging.set_verbosity_error()
VOCAB = 32
ROOT = Path(__file__).resolve().parents[1]


def tiny_gpt2(seed=0, dropout=0.0, cls=GPT2LMHeadModel, **config):
    torch.manual_seed(seed)
    return cls(
        GPT2Config(
            n_layer=2,
            n_embd=16,
            n_head=2,
            vocab_size=VOCAB,
            n_positions=16,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            **config,
        )
    )


def token_data(rows=32, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(1, VOCAB, (rows, length), generator=g)]


def make_args(out_dir, **overrides):
    kwargs = dict(
        max_steps=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(str(out_dir), **kwargs)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def causal_ce(logits, batch):
    """An independent causal-LM loss: predict token t+1 from tokens ≤ t, mean over tokens."""
    labels = batch["labels"]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1)
    )


@pytest.mark.parametrize("method", ["fsam", "sam", "looksam"])
def test_trains_saves_and_resumes_exactly_like_an_uninterrupted_run(tmp_path, method):
    data = token_data()
    save = dict(save_strategy="steps", save_steps=2)
    straight = SAMTrainer(
        model=tiny_gpt2(dropout=0.1),
        args=make_args(tmp_path / "straight", **save),
        train_dataset=data,
        sam_method=method,
        rho=0.05,
    )
    straight.train()
    checkpoint = tmp_path / "straight" / "checkpoint-2"

    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)  # what Trainer wrote
    # LookSAM's cheap steps after the resume reuse the g_v of its step 0
    assert set(saved) == {"base_optimizer", "counters", "config"} | (
        {"look_direction"} if method == "looksam" else set()
    )
    assert saved["counters"]["steps"] == 2 and saved["config"]["rho"] == 0.05
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(saved["base_optimizer"]["state"][0])

    resumed = SAMTrainer(
        model=tiny_gpt2(seed=99, dropout=0.1),
        args=make_args(tmp_path / "resumed", **save),
        train_dataset=data,
        sam_method=method,
        rho=0.05,
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4 and resumed.sam_optimizer.counters["steps"] == 4
    assert torch.equal(flat(resumed.model), flat(straight.model))
    a, b = straight.sam_optimizer.base_optimizer.state_dict(), resumed.sam_optimizer.base_optimizer.state_dict()
    for key in a["state"]:
        assert torch.equal(a["state"][key]["exp_avg_sq"], b["state"][key]["exp_avg_sq"])

    def losses(t):
        return [log["loss"] for log in t.state.log_history if "loss" in log and log["step"] > 2]

    assert losses(resumed) == losses(straight)
    assert resumed.lr_scheduler.get_last_lr() == straight.lr_scheduler.get_last_lr()


@pytest.mark.parametrize("method", ["fsam", "sam"])
def test_accumulation_window_equals_one_step_on_the_whole_window(tmp_path, method):
    """Accumulated gradients are never wiped: 2 micro-batches of 4 = 1 batch of 8, ascent rows included."""
    data = token_data()
    runs = []
    for accumulation, batch in ((2, 4), (1, 8)):
        trainer = SAMTrainer(
            model=tiny_gpt2(),
            train_dataset=data,
            sam_method=method,
            rho=0.05,
            args=make_args(
                tmp_path / str(accumulation),
                max_steps=3,
                optim="sgd",
                learning_rate=0.1,
                gradient_accumulation_steps=accumulation,
                per_device_train_batch_size=batch,
            ),
        )  # SGD: Adam amplifies roundoff
        trainer.train()
        runs.append(trainer)
    torch.testing.assert_close(flat(runs[0].model), flat(runs[1].model), rtol=0, atol=1e-6)

    def loss(t):
        return [log["loss"] for log in t.state.log_history if "loss" in log]

    assert loss(runs[0]) == pytest.approx(loss(runs[1]), rel=1e-5)  # logged once per step, not per micro-batch


def test_a_trainer_step_is_the_driver_step_on_the_window_with_the_models_loss(tmp_path):
    """ascent_fraction=1 (row order is then irrelevant); Trainer's SGD, clip at max_grad_norm."""
    data = token_data(rows=8)
    trainer = SAMTrainer(
        model=tiny_gpt2(),
        args=make_args(tmp_path, max_steps=1, optim="sgd", learning_rate=0.1),
        train_dataset=data,
        sam_method="fsam",
        rho=0.05,
        ascent_fraction=1.0,
    )
    trainer.train()

    model = tiny_gpt2()
    opt = samlm.FunctionalSAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, ascent_fraction=1.0)
    batch = {k: torch.stack([row[k] for row in data]) for k in data[0]}
    # Trainer's token weighting: the summed token loss over the label tokens it counts (num_items_in_batch)
    items = float(trainer._get_num_items_in_batch([batch], "cpu"))
    tokens = batch["labels"][:, 1:].numel()
    stats = opt.train_step(
        batch,
        lambda b: model(input_ids=b["input_ids"]).logits,
        lambda logits, b: causal_ce(logits, b) * tokens / items,
        max_grad_norm=1.0,
    )
    torch.testing.assert_close(flat(trainer.model), flat(model), rtol=0, atol=1e-6)
    assert trainer.state.log_history[0]["loss"] == pytest.approx(stats.ascent_loss, rel=1e-5)
    assert trainer.state.log_history[0]["grad_norm"] == pytest.approx(stats.update_grad_norm, rel=1e-5)
    assert trainer.state.log_history[0]["loss_perturbed"] == pytest.approx(stats.loss_perturbed, rel=1e-4)


def test_user_optimizer_and_scheduler_are_used_and_the_scheduler_acts(tmp_path):
    model = tiny_gpt2()
    opt = samlm.PreconditionedSAM(torch.optim.AdamW(model.parameters(), lr=1e-2), rho=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    trainer = SAMTrainer(
        model=model, args=make_args(tmp_path, max_steps=3), train_dataset=token_data(), optimizers=(opt, scheduler)
    )
    trainer.train()
    assert trainer.sam_optimizer is opt and opt.counters["steps"] == 3
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**3)
    # SAM's default ascent_fraction < 1: the loss at w is on the ascent rows only, logged as ascent_loss
    assert [log["learning_rate"] for log in trainer.state.log_history if "ascent_loss" in log] == pytest.approx(
        [1e-2, 5e-3, 2.5e-3]
    )


def test_fp16_overflow_skips_the_step_and_the_scheduler_and_backs_the_scale_off_once(tmp_path):
    """accelerate's GradScaler (injected: accelerate makes none on CPU) is run by the driver, once per step."""
    calls = {"n": 0}

    def loss_with_one_overflow(logits, batch):
        calls["n"] += 1
        value = causal_ce(logits, batch)
        return value + logits.float().sum() * float("inf") if calls["n"] == 1 else value  # step 1's ascent

    model = tiny_gpt2()
    trainer = SAMTrainer(
        model=model,
        args=make_args(tmp_path, max_steps=3),
        train_dataset=token_data(),
        sam_method="sam",
        sam_loss=loss_with_one_overflow,
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    trainer.accelerator.scaler = scaler
    trainer.train()
    opt = trainer.sam_optimizer
    assert opt.counters["skipped_steps"] == 1 and opt.counters["ascent_nonfinite"] == 1 and opt.counters["steps"] == 2
    assert scaler.get_scale() == 2.0**9  # backed off once, not once per pass
    assert trainer.optimizer.scaler is None  # accelerate's wrapper no longer steps the scaler
    assert trainer.lr_scheduler.last_epoch == 2  # the skipped step kept its learning rate
    assert torch.isfinite(flat(trainer.model)).all()


@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_sequence_classification_trains_on_the_models_own_loss_without_sam_loss(tmp_path, method):
    """Every standard head is covered in tests/test_hf_heads.py."""
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": ids, "labels": torch.tensor(int(ids[0]) % 3)}
        for ids in torch.randint(1, VOCAB, (16, 8), generator=g)
    ]
    model = tiny_gpt2(cls=GPT2ForSequenceClassification, num_labels=3)
    assert head_kind(model) == "ForSequenceClassification" and head_kind(tiny_gpt2()) == "ForCausalLM"
    before = flat(model)
    trainer = SAMTrainer(model=model, args=make_args(tmp_path, max_steps=2), train_dataset=data, sam_method=method)
    trainer.train()
    assert trainer.sam_optimizer.counters["steps"] == 2 and not torch.equal(flat(model), before)


def test_bad_configurations_are_refused_with_clear_messages(tmp_path):
    model, args, data = tiny_gpt2(), make_args(tmp_path), token_data()
    with pytest.raises(ValueError, match="SAM-family optimizer"):
        SAMTrainer(model=model, args=args, train_dataset=data, optimizers=(torch.optim.AdamW(model.parameters()), None))
    with pytest.raises(ValueError, match="sam_method must be one of"):
        SAMTrainer(model=model, args=args, train_dataset=data, sam_method="adam")
    with pytest.raises(ValueError, match="not both"):
        SAMTrainer(
            model=model,
            args=args,
            train_dataset=data,
            sam_method="sam",
            optimizers=(samlm.SAM(torch.optim.AdamW(model.parameters())), None),
        )
    with pytest.raises(ValueError, match="DeepSpeed"):  # reaches inside: a DeepSpeed Trainer needs deepspeed installed
        _refuse_deepspeed(SimpleNamespace(is_deepspeed_enabled=True))


def test_trainer_optimizer_shares_groups_and_state_and_never_steps():
    model = tiny_gpt2()
    sam = samlm.SAM(torch.optim.AdamW(model.parameters(), lr=1e-2))
    facade = TrainerOptimizer(sam)
    assert facade.param_groups is sam.base_optimizer.param_groups
    assert len(facade.param_groups) == 1 and facade.param_groups[0]["params"] == list(model.parameters())
    before = flat(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    facade.step()
    assert torch.equal(flat(model), before)
    with pytest.raises(ValueError, match="closure"):
        facade.step(lambda: None)
    sam.base_optimizer.step()
    assert facade.state is sam.base_optimizer.state and len(facade.state) == len(list(model.parameters()))
    assert set(facade.state_dict()) == {"base_optimizer", "counters", "config"}
    assert set(TrainerOptimizer(sam, flat_state_dict=True).state_dict()) == {"state", "param_groups"}


def test_example_script_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("hf_trainer_sam", ROOT / "examples" / "hf_trainer_sam.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    trainer, result = example.main(["--max-steps", "2", "--method", "fsam", "--output-dir", str(tmp_path)])
    assert result.global_step == 2 and trainer.sam_optimizer.counters["steps"] == 2
    assert (tmp_path / "checkpoint-2" / "optimizer.pt").exists()


# -- DDP through accelerate: two processes (this file as a script, torchrun's environment) ------------
def _ddp_worker(out_dir: str) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    torch.set_num_threads(1)
    record = {"forward_synced": [], "allreduces": 0, "wrapped": []}

    class Recording(SAMTrainer):
        def sam_step(self, model, micro_batches):
            if not record["wrapped"]:
                model.register_forward_pre_hook(
                    lambda module, args: record["forward_synced"].append(bool(module.require_backward_grad_sync))
                )

                def counting(state, bucket):
                    record["allreduces"] += 1
                    return allreduce_hook(None, bucket)

                model.register_comm_hook(None, counting)
            record["wrapped"].append(type(model).__name__)
            return super().sam_step(model, micro_batches)

    trainer = Recording(
        model=tiny_gpt2(),
        train_dataset=token_data(),
        sam_method="sam",
        rho=0.05,
        args=make_args(out_dir, max_steps=2, ddp_backend="gloo"),
    )
    trainer.train()
    rank = trainer.args.process_index
    torch.save(
        {"params": flat(trainer.model), "world": trainer.args.world_size, **record}, Path(out_dir) / f"rank{rank}.pt"
    )


def test_ddp_via_accelerate_runs_the_ascent_under_no_sync_and_syncs_once_per_step(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, str(tmp_path)],
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        outputs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output[-4000:]
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for res in results:
        assert res["world"] == 2 and res["wrapped"] == ["DistributedDataParallel"] * 2
        # per step: ascent (2 rows of micro-batch 1) and descent on micro-batch 1 local, micro-batch 2 synced
        assert res["forward_synced"] == [False, False, True] * 2
        assert res["allreduces"] == 2  # one all-reduce per optimizer step (one bucket)
    assert torch.equal(results[0]["params"], results[1]["params"])


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])


@pytest.mark.parametrize("method,clean_loss", [("msam", None), ("msam", True), ("looksam", None)])
def test_the_logged_losses_name_what_each_method_measured(tmp_path, method, clean_loss):
    """Momentum-SAM has no pass at w: its one loss is loss_perturbed and Trainer's loss is not
    logged, unless clean_loss=True pays for it; LookSAM's full SAM steps log ascent_loss (the ascent
    rows at w), its cheap steps, one pass at w over every row, the plain run's loss."""
    trainer = SAMTrainer(
        model=tiny_gpt2(),
        args=make_args(tmp_path, max_steps=3, gradient_accumulation_steps=1),
        train_dataset=token_data(),
        sam_method=method,
        clean_loss=clean_loss,
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss_perturbed" in log]
    assert len(logs) == 3
    if method == "msam":
        assert all(("loss" in log) == bool(clean_loss) and "ascent_loss" not in log for log in logs)
        assert trainer.sam_last_stats.ascent_loss is None
    else:
        assert [("ascent_loss" in log, "loss" in log) for log in logs] == [(True, False), (False, True), (False, True)]
