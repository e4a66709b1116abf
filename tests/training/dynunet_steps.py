"""``[torchrun ...] python -m tests.training.dynunet_steps CONFIG OUT [KEY=VALUE ...]``: three
optimizer steps of the DynUNet trainer's own batches, network (DDP under torchrun) and loss, with plain
SGD at ``train.dynunet.lr`` in place of AdamW; rank 0 writes ``OUT/steps_<world size>.pt`` with the
first step's averaged gradients (before any optimizer step) and the weights after the third."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tgated.config import load_config
from tgated.training.distributed import init_distributed
from tgated.training.dynunet import DynUNetTrainer

STEPS = 3


def run(config: str, out: Path, overrides: list[str]) -> Path:
    cfg = load_config(config, ["train.device=cpu", "train.grad_clip=0", "train.grad_accum=1", *overrides])
    ctx = init_distributed("cpu")
    try:
        trainer = DynUNetTrainer(cfg, out / f"run{ctx.world_size}", ctx, resume=False, quiet=True)
        trainer.setup()
        # SGD moves each weight by lr × its gradient, so float-rounding differences stay that small;
        # AdamW's step is about ±lr whatever the gradient's size (docs/architecture.md, DynUNet)
        trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=cfg.train.dynunet.lr)
        data = trainer._epoch_data()
        grads: dict[str, torch.Tensor] = {}
        for i in range(STEPS):
            loss, _, _ = trainer._batch_loss(data[i])
            loss.backward()
            if i == 0:
                grads = {k: p.grad.detach().clone() for k, p in trainer.model.named_parameters()}
            trainer._optimizer_step()
        path = out / f"steps_{ctx.world_size}.pt"
        if ctx.is_main:
            weights = {k: p.detach().clone() for k, p in trainer.model.named_parameters()}
            torch.save({"grads": grads, "weights": weights, "rows": data.rows(0)}, path)
        ctx.barrier()
        return path
    finally:
        ctx.close()


if __name__ == "__main__":
    run(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
