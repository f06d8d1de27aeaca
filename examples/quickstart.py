"""Quickstart: every samlm optimizer on a tiny byte-level GPT-2, through both call surfaces.

python examples/quickstart.py
"""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import samlm

torch.manual_seed(0)
config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=32, bos_token_id=255, eos_token_id=255)
tokens = torch.tensor(list(b"To be, or not to be, that is the question. " * 40))
batch = tokens[: 16 * 32].view(16, 32)  # 16 rows of 32 bytes


def forward(batch):  # model outputs (logits), batch dimension first
    return model(input_ids=batch).logits


def loss(logits, batch):  # the batch's mean loss
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())


for method in (samlm.SAM, samlm.ASAM, samlm.FunctionalSAM, samlm.PreconditionedSAM, samlm.PreconditionedFunctionalSAM):
    model = GPT2LMHeadModel(config)
    opt = method(torch.optim.AdamW(model.parameters(), lr=3e-3))  # wraps any optimizer instance
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)  # schedulers act on either
    for _ in range(10):
        stats = opt.train_step(batch, forward, loss)  # ascent on the first quarter of the rows
        schedule.step()
    print(
        f"{method.__name__:<28} ascent-rows loss at w {stats.ascent_loss:.3f}  batch loss at w+eps {stats.loss_perturbed:.3f}  "
        f"|eps| {stats.eps_norm:.3f}"
    )

# The surface davda54/sam users know: first_step / second_step (or step(closure)).
model = GPT2LMHeadModel(config)
opt = samlm.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
for _ in range(3):
    loss(forward(batch), batch).backward()
    opt.first_step(zero_grad=True)  # w -> w + eps
    loss(forward(batch), batch).backward()
    opt.second_step(zero_grad=True)  # restore w exactly, then the SGD step
print("davda54-style SAM: done")

# A model with BatchNorm: one pass per step moves its running statistics (here the ascent, at w).
net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
xy = (torch.randn(32, 8), torch.randint(0, 3, (32,)))
opt = samlm.SAM(torch.optim.SGD(net.parameters(), lr=0.1), rho=0.05, running_stats="ascent")
opt.train_step(xy, lambda b: net(b[0]), lambda out, b: torch.nn.functional.cross_entropy(out, b[1]), model=net)
two_step = samlm.SAM(torch.optim.SGD(net.parameters(), lr=0.1), rho=0.05)
torch.nn.functional.cross_entropy(net(xy[0]), xy[1]).backward()
two_step.first_step(zero_grad=True)
with samlm.frozen_running_stats(net):  # the pass at w + eps leaves the statistics alone
    torch.nn.functional.cross_entropy(net(xy[0]), xy[1]).backward()
two_step.second_step(zero_grad=True)
print(f"BatchNorm: {int(net[1].num_batches_tracked)} running-statistics updates in 2 SAM steps")
