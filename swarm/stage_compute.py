"""A stage peer's compute: forward, loss, backward and the optimizer's step on its device, each timed. Blocking;
the stage server runs these on its compute executor, never on the event loop."""

from __future__ import annotations

import time
from typing import Callable, Optional, Tuple

import torch

from swarm.model import StageModule, causal_lm_loss
from swarm.optimizer import StageOptimizer


class StageCompute:
    """The stage's module and optimizer on ``device`` (autocast in ``autocast_dtype`` on CUDA, else float32)."""

    def __init__(
        self,
        module: StageModule,
        optimizer: StageOptimizer,
        device: torch.device,
        autocast_dtype: Optional[str] = None,
    ):
        self.module, self.optimizer, self.device, self.autocast_dtype = (
            module,
            optimizer,
            device,
            autocast_dtype,
        )
        self.after_step: Optional[Callable[[], None]] = None  # e.g. the stage's checkpointer, on this thread

    def autocast(self):
        if self.device.type == "cuda" and self.autocast_dtype:
            return torch.autocast("cuda", dtype=getattr(torch, self.autocast_dtype))
        return torch.autocast("cpu", enabled=False)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, float]:
        """``(input on the device, requiring grad if activations; output; seconds)``."""
        started = time.perf_counter()
        x = x.to(self.device)
        if x.is_floating_point():
            x = x.float().requires_grad_(True)
        with torch.enable_grad(), self.autocast():
            out = self.module(x)
        return x, out, time.perf_counter() - started

    def optimizer_step(self, batch_size: int) -> float:
        """Hand the micro-batch's gradients to the optimizer; returns the seconds it took (averaging included)."""
        started = time.perf_counter()
        self.optimizer.step(batch_size=batch_size)
        if self.after_step is not None:
            self.after_step()
        return time.perf_counter() - started

    def backward(
        self, x: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor
    ) -> Tuple[torch.Tensor, float, float]:
        """``(gradient of the input, backward seconds, optimizer seconds)``."""
        started = time.perf_counter()
        out.backward(grad_out.to(device=out.device, dtype=out.dtype))
        bwd_s = time.perf_counter() - started
        return x.grad, bwd_s, self.optimizer_step(x.shape[0])

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, float]:
        started = time.perf_counter()
        with torch.enable_grad():
            loss = causal_lm_loss(logits, labels.to(logits.device))
        return loss, time.perf_counter() - started

    def audit_gradient(self, x: torch.Tensor, loss: torch.Tensor) -> Tuple[float, torch.Tensor, float]:
        """The gradient of an audited micro-batch's loss with respect to this stage's inputs only: the weights'
        gradients are neither computed nor accumulated, so an audit never trains."""
        started = time.perf_counter()
        (grad,) = torch.autograd.grad(loss, x)
        return float(loss.detach()), grad, time.perf_counter() - started

    def backward_loss(
        self, x: torch.Tensor, loss: torch.Tensor
    ) -> Tuple[float, Optional[torch.Tensor], float, float]:
        """The last stage's backward from its loss: ``(loss, gradient of the input or None for token ids, backward
        seconds, optimizer seconds)``."""
        started = time.perf_counter()
        loss.backward()
        bwd_s = time.perf_counter() - started
        opt_s = self.optimizer_step(x.shape[0])
        return float(loss.detach()), x.grad if x.is_floating_point() else None, bwd_s, opt_s
