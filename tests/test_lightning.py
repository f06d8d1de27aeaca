"""samlm.SAM under Lightning's automatic optimization: ``optimizer.step(closure)``, checkpoints."""

import pytest
import torch

import samlm

L = pytest.importorskip("lightning")


class Tiny(L.LightningModule):
    def __init__(self, sam_every=1):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4))
        self.sam_every = sam_every

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return samlm.SAM(
            torch.optim.AdamW(self.parameters(), lr=1e-2), rho=0.1, ascent_fraction=1.0, sam_every=self.sam_every
        )


def loader():
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)  # 4 steps per epoch


def trainer(**stop):
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        **stop,
    )


def test_lightning_trains_with_sam_and_counts_the_steps():
    module = Tiny(sam_every=2)
    before = [p.detach().clone() for p in module.parameters()]
    trainer(max_steps=6).fit(module, loader())
    assert any(not torch.equal(a, p) for a, p in zip(before, module.parameters()))
    opt = module.optimizers().optimizer
    assert isinstance(opt, samlm.SAM)
    assert opt.counters["steps"] == 6 and opt.counters["sam_steps"] == 3 and opt.counters["plain_steps"] == 3


def test_lightning_resume_restores_the_base_optimizers_moments(tmp_path):
    """4 steps (one epoch; mid-cycle of sam_every=3), a checkpoint, a resume to 8 = 8 straight."""
    straight = Tiny(sam_every=3)
    trainer(max_epochs=2).fit(straight, loader())

    first = Tiny(sam_every=3)
    t = trainer(max_epochs=1)
    t.fit(first, loader())
    t.save_checkpoint(tmp_path / "half.ckpt")
    resumed = Tiny(sam_every=3)
    second = trainer(max_epochs=2)
    second.fit(resumed, loader(), ckpt_path=tmp_path / "half.ckpt")
    assert second.global_step == 8
    opt = resumed.optimizers().optimizer
    assert opt.counters["steps"] == 8 and opt.counters["sam_steps"] == 3  # steps 0, 3, 6
    assert opt.base_optimizer.state_dict()["state"][0]["step"] == 8
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_lightning_trains_with_looksam_and_momentum_sam_through_the_closure():
    """LookSAM's and Momentum-SAM's step(closure) under Lightning: the full and cheap steps counted."""
    for build, sam_steps in (
        (lambda params: samlm.LookSAM(torch.optim.AdamW(params, lr=1e-2), rho=0.1, look_every=3), 6),
        (lambda params: samlm.MomentumSAM(torch.optim.AdamW(params, lr=1e-2), rho=0.1), 6),
    ):
        module = Tiny()
        module.configure_optimizers = lambda m=module, b=build: b(m.parameters())
        before = [p.detach().clone() for p in module.parameters()]
        trainer(max_steps=6).fit(module, loader())
        assert any(not torch.equal(a, p) for a, p in zip(before, module.parameters()))
        opt = module.optimizers().optimizer
        assert opt.counters["steps"] == 6 and opt.counters["sam_steps"] == sam_steps
