"""Quickstart: every samlm optimizer on a tiny byte-level GPT-2, through both call surfaces.

    python examples/quickstart.py
"""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import samlm

torch.manual_seed(0)
config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=32,
                    bos_token_id=255, eos_token_id=255)
tokens = torch.tensor(list(b"To be, or not to be, that is the question. " * 40))
batch = tokens[: 16 * 32].view(16, 32)  # 16 rows of 32 bytes


def forward(batch):  # model outputs (logits), batch dimension first
    return model(input_ids=batch).logits


def loss(logits, batch):  # the batch's mean loss
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())


for method in (samlm.SAM, samlm.ASAM, samlm.FunctionalSAM, samlm.PreconditionedSAM,
               samlm.PreconditionedFunctionalSAM):
    model = GPT2LMHeadModel(config)
    opt = method(torch.optim.AdamW(model.parameters(), lr=3e-3))  # wraps any optimizer instance
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)  # schedulers act on either
    for step in range(10):
        stats = opt.train_step(batch, forward, loss)  # ascent on the first quarter of the rows
        schedule.step()
    print(f"{method.__name__:<28} loss {stats.loss:.3f}  loss(w+eps) {stats.loss_perturbed:.3f}  "
          f"|eps| {stats.eps_norm:.3f}")

# The surface davda54/sam users know: first_step / second_step (or step(closure)).
model = GPT2LMHeadModel(config)
opt = samlm.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
for step in range(3):
    loss(forward(batch), batch).backward()
    opt.first_step(zero_grad=True)  # w -> w + eps
    loss(forward(batch), batch).backward()
    opt.second_step(zero_grad=True)  # restore w exactly, then the SGD step
print("davda54-style SAM: done")
