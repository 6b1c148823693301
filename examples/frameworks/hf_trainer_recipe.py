"""Hugging Face Trainer: attach clipping to the optimizer you pass, with max_grad_norm=0.

The Trainer keeps its own optimizer object (Accelerate wraps it), so attach mode fits:
clipping runs in the optimizer's step hooks and its state rides in the optimizer's own
state dict. Set ``max_grad_norm=0`` or the Trainer clips as well:
``clipopt.integrations.huggingface.install(trainer)`` warns at the start if it is on,
and adds clipopt's statistics to the Trainer's logs. (Passing a ``ClippedOptimizer`` in
``optimizers=`` works too.)

Run: python examples/frameworks/hf_trainer_recipe.py
     (needs: pip install transformers accelerate)
"""

from __future__ import annotations

import tempfile

import torch
from transformers import Trainer, TrainingArguments

import clipopt
from clipopt.integrations import huggingface


class Regressor(torch.nn.Module):
    """Any torch module works with the Trainer if forward returns a dict with "loss"."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
        )

    def forward(self, x, labels=None):
        out = self.net(x)
        loss = None if labels is None else torch.nn.functional.mse_loss(out, labels)
        return {"loss": loss, "logits": out}


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 256) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        spikes = torch.where(torch.rand(n, 1, generator=g) < 0.05, 50.0, 1.0)
        self.y = self.x.sum(1, keepdim=True) * spikes

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def main(steps: int = 40, max_grad_norm: float = 0.0, args_class=TrainingArguments):
    torch.manual_seed(0)
    model = Regressor()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    clipping = clipopt.attach(optimizer, "norm", max_norm=0.5)
    with tempfile.TemporaryDirectory() as out:
        args = args_class(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=16,
            logging_steps=5,
            max_grad_norm=max_grad_norm,  # 0: clipopt clips, the Trainer must not
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=Rows(), optimizers=(optimizer, None)
        )
        huggingface.install(trainer)  # warns if the Trainer clips too; logs statistics
        trainer.train()
    counts = clipping.counts()
    print(f"clipped {counts['clipped_steps']} of {counts['steps']} steps")
    return clipping, trainer


if __name__ == "__main__":
    main()
