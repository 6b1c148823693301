"""PyTorch Lightning: return a ClippedOptimizer from configure_optimizers.

Keep Lightning's own clipping off (``gradient_clip_val=None``, its default), or clipping
happens twice: ``clipopt.integrations.lightning.ClipoptCallback`` warns at the first step
if it is on, and logs clipopt's statistics through Lightning's logger.

Run: python examples/frameworks/lightning_recipe.py   (needs: pip install lightning)
"""

from __future__ import annotations

import lightning as L
import torch

import clipopt
from clipopt.integrations.lightning import ClipoptCallback


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return clipopt.ClippedOptimizer(
            torch.optim.AdamW(self.parameters(), lr=1e-2), "norm", max_norm=0.5
        )


def main(steps: int = 40, clip_val: float | None = None, logger=False):
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x.sum(1, keepdim=True) * torch.where(torch.rand(256, 1) < 0.05, 50.0, 1.0)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=16
    )
    model = Regressor()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        gradient_clip_val=clip_val,  # None: clipopt clips, Lightning must not
        logger=logger,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ClipoptCallback(every=10)],
    )
    trainer.fit(model, loader)
    opt = trainer.optimizers[0]
    print(f"clipped {opt.counts()['clipped_steps']} of {opt.counts()['steps']} steps")
    return opt, trainer


if __name__ == "__main__":
    main()
