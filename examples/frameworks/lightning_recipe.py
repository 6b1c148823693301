"""PyTorch Lightning: return a ClippedOptimizer from configure_optimizers.

Keep Lightning's own clipping off (``gradient_clip_val=None``, its default), or clipping
happens twice. ``ClipStatsCallback`` logs clipopt's statistics through Lightning's logger.

Run: python examples/frameworks/lightning_recipe.py   (needs: pip install lightning)
"""

from __future__ import annotations

import lightning as L
import torch

import clipopt


class ClipStatsCallback(L.Callback):
    """Log clipopt's statistics (pre-clip norm, threshold, coef, clip rate)."""

    def __init__(self, every: int = 50) -> None:
        self.every = every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        opt = trainer.optimizers[0]
        if batch_idx % self.every or not isinstance(opt, clipopt.ClippedOptimizer):
            return
        if opt.last_stats is not None:  # one host read, on logging steps only
            stats = opt.last_stats.to_dict()
            counts = opt.counts()
            pl_module.log_dict(
                {
                    "clip/norm": stats["norm"],
                    "clip/threshold": stats["threshold"],
                    "clip/coef": stats["coef"],
                    "clip/rate": counts["clipped_steps"] / max(counts["steps"], 1),
                }
            )


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


def main(steps: int = 40) -> clipopt.ClippedOptimizer:
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
        gradient_clip_val=None,  # clipopt clips; Lightning must not
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ClipStatsCallback(every=10)],
    )
    clipopt.check_double_clipping(trainer)  # warns if Lightning would clip too
    trainer.fit(model, loader)
    opt = trainer.optimizers[0]
    print(f"clipped {opt.counts()['clipped_steps']} of {opt.counts()['steps']} steps")
    return opt


if __name__ == "__main__":
    main()
