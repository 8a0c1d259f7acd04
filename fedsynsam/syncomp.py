"""Compressors that use the global model as the decompressor: 3SFC and FedSynth.

Both turn a client's update ``g`` (flat, float32) into a few synthetic samples; the
receiver, holding the same global model ``w``, turns them back into an update. The
floats travel as a fedcomp identity payload (so the wire format, checksum and exact
``nbytes`` are fedcomp's), and the byte count is exactly ``52 + 4 * floats``.

* :class:`ThreeSFC` (single-step synthetic features compressor): ``M`` samples
  ``(x~, y~)`` (``y~`` real-valued soft-label logits) and a scale ``s``, so that
  ``g_hat = grad_w CE(f_w(x~), softmax(y~))`` points like ``g``: Adam maximises
  ``|cos(g_hat, g)|`` (double backprop), keeping the best iterate; then
  ``s = <g_hat, g> / ||g_hat||^2``; error feedback keeps ``g - s * g_hat``. The
  receiver decodes ``s * g_hat``. Floats: ``M * (input size + classes) + 1``.
* :class:`FedSynth`: ``B`` batches of ``m`` samples with learnable soft labels and a
  learnable step size, such that ``B`` differentiable SGD steps from ``w`` land on
  ``w + g`` (Adam minimises ``||replay - g||^2 / ||g||^2``, keeping the best). The
  receiver replays them. Floats: ``B * m * (input size + classes) + 1``.

Encoding is deterministic given a generator, and decoding recomputes exactly what
the encoder computed (same model, same ops), so sender and receiver agree to the bit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.func import functional_call

import fedcomp
from fedcomp.flat import FlatSpec, unflatten

from .algorithms import soft_cross_entropy
from .optim import Adam

__all__ = ["ModelCompressor", "ThreeSFC", "FedSynth", "synthetic_gradient", "replay"]


def synthetic_gradient(model: nn.Module, spec: FlatSpec, w: Tensor, x: Tensor, y: Tensor, *, create_graph=False):
    """``grad_w CE(f_w(x), softmax(y))`` as a flat tensor (``w`` flat)."""
    w = w if w.requires_grad else w.detach().requires_grad_(True)
    loss = soft_cross_entropy(functional_call(model, unflatten(w, spec), (x,)), y)
    (g,) = torch.autograd.grad(loss, w, create_graph=create_graph)
    return g


def replay(model: nn.Module, spec: FlatSpec, w: Tensor, xs, ys, log_lr: Tensor) -> Tensor:
    """``theta_B`` (flat): one differentiable SGD step per batch ``xs[j], ys[j]`` from ``w`` (flat).

    The unroll keeps one tensor per parameter and flattens once at the end: stepping a flat
    ``theta`` through views would make every step's backward zero-fill and add full-size
    gradients for each view (about half of a distillation's time on the digits MLP).
    """
    names = spec.names
    params = [t.detach().clone().requires_grad_(True) for t in unflatten(w, spec).values()]
    lr = log_lr.exp()
    for x, y in zip(xs, ys):
        logits = functional_call(model, dict(zip(names, params)), (x,))
        grads = torch.autograd.grad(soft_cross_entropy(logits, y), params, create_graph=True, materialize_grads=True)
        params = [p - lr * g for p, g in zip(params, grads)]
    return torch.cat([p.reshape(-1) for p in params])


def _check_positive_int(name: str, value, lo: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}; got {value!r}")


class ModelCompressor:
    """Base of the model-as-decompressor compressors; per-key error-feedback residuals."""

    kind = ""

    def __init__(
        self,
        model: nn.Module,
        spec: FlatSpec,
        input_shape,
        num_classes: int,
        *,
        iters: int,
        lr: float,
        error_feedback: bool = True,
        seed: int = 0,
    ):
        _check_positive_int("iters", iters)
        _check_positive_int("num_classes", num_classes, 2)
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite number > 0; got {lr!r}")
        self.model, self.spec = model, spec
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        self.iters, self.lr = iters, float(lr)
        self.error_feedback = error_feedback
        self.seed = seed
        self.calls = 0
        self.residuals: dict[str, Tensor] = {}

    @property
    def input_size(self) -> int:
        return math.prod(self.input_shape)

    def floats(self) -> int:
        raise NotImplementedError

    def wire_bytes(self, numel: int | None = None) -> int:
        """Exact wire size: an identity payload of :meth:`floats` float32 values."""
        return fedcomp.Identity().wire_bytes(self.floats())

    def _generator(self) -> torch.Generator:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.calls) % (2**63 - 1))
        self.calls += 1
        return g

    def compress(self, delta: Tensor, key: str, w: Tensor) -> fedcomp.Payload:
        """Encode ``delta`` (+ the residual of ``key``) at global model ``w``; updates the residual."""
        g = delta.float()
        if self.error_feedback:
            r = self.residuals.get(key)
            if r is not None:
                g = g + r
        vector = self._encode(g, w.detach(), self._generator())
        payload = fedcomp.Payload("identity", torch.float32, vector.numel(), {}, (vector,))
        if self.error_feedback:
            self.residuals[key] = g - self.decode(payload, w)
        return payload

    def decode(self, payload: fedcomp.Payload, w: Tensor) -> Tensor:
        """The dense update a payload stands for, at global model ``w``: ``[numel]`` float32."""
        if payload.kind != "identity" or payload.numel != self.floats():
            raise ValueError(f"a {self.kind} payload is an identity payload of {self.floats()} floats; got {payload}")
        return self._decode(payload.sections[0].float(), w.detach())

    def state_dict(self) -> dict:
        return {"calls": self.calls, "residuals": {k: v.clone() for k, v in self.residuals.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])
        self.residuals = {k: v.clone() for k, v in state["residuals"].items()}


class ThreeSFC(ModelCompressor):
    """3SFC: ``samples`` synthetic samples and a scale (see the module docstring)."""

    kind = "3sfc"

    def __init__(
        self,
        model,
        spec,
        input_shape,
        num_classes,
        *,
        samples: int = 1,
        iters: int = 30,
        lr: float = 0.1,
        error_feedback: bool = True,
        seed: int = 0,
    ):
        super().__init__(
            model, spec, input_shape, num_classes, iters=iters, lr=lr, error_feedback=error_feedback, seed=seed
        )
        _check_positive_int("samples", samples)
        self.samples = samples

    def floats(self) -> int:
        return self.samples * (self.input_size + self.num_classes) + 1

    def _split(self, vector: Tensor):
        m, d, c = self.samples, self.input_size, self.num_classes
        x = vector[: m * d].view(m, *self.input_shape)
        y = vector[m * d : m * (d + c)].view(m, c)
        return x, y, vector[-1]

    def _encode(self, g: Tensor, w: Tensor, gen: torch.Generator) -> Tensor:
        # drawn on the CPU generator, then moved: the same samples on every device
        x = torch.randn((self.samples, *self.input_shape), generator=gen).to(g.device).requires_grad_(True)
        y = torch.randn((self.samples, self.num_classes), generator=gen).to(g.device).requires_grad_(True)
        opt = Adam([([x, y], self.lr)])
        best, best_cos = (x.detach().clone(), y.detach().clone()), -1.0
        g_norm = g.norm()
        for _ in range(self.iters):
            g_hat = synthetic_gradient(self.model, self.spec, w, x, y, create_graph=True)
            cos = (g_hat @ g) / (g_hat.norm() * g_norm + 1e-30)
            if abs(float(cos.detach())) > best_cos:
                best, best_cos = (x.detach().clone(), y.detach().clone()), abs(float(cos.detach()))
            opt.zero_grad()
            (-cos.abs()).backward()
            opt.step()
        x, y = best
        g_hat = synthetic_gradient(self.model, self.spec, w, x, y)
        s = (g_hat @ g) / (g_hat @ g_hat).clamp_min(1e-30)
        return torch.cat([x.reshape(-1), y.reshape(-1), s.reshape(1)]).float()

    def _decode(self, vector: Tensor, w: Tensor) -> Tensor:
        x, y, s = self._split(vector)
        return s * synthetic_gradient(self.model, self.spec, w, x, y)


class FedSynth(ModelCompressor):
    """FedSynth: ``batches`` x ``batch_size`` synthetic samples replayed as SGD steps."""

    kind = "fedsynth"

    def __init__(
        self,
        model,
        spec,
        input_shape,
        num_classes,
        *,
        batches: int = 1,
        batch_size: int = 1,
        iters: int = 30,
        lr: float = 0.1,
        init_step: float = 0.05,
        error_feedback: bool = True,
        seed: int = 0,
    ):
        super().__init__(
            model, spec, input_shape, num_classes, iters=iters, lr=lr, error_feedback=error_feedback, seed=seed
        )
        _check_positive_int("batches", batches)
        _check_positive_int("batch_size", batch_size)
        if not init_step > 0:
            raise ValueError(f"init_step must be > 0; got {init_step!r}")
        self.batches, self.batch_size, self.init_step = batches, batch_size, float(init_step)

    def floats(self) -> int:
        return self.batches * self.batch_size * (self.input_size + self.num_classes) + 1

    def _split(self, vector: Tensor):
        b, m, d, c = self.batches, self.batch_size, self.input_size, self.num_classes
        xs = vector[: b * m * d].view(b, m, *self.input_shape)
        ys = vector[b * m * d : b * m * (d + c)].view(b, m, c)
        return xs, ys, vector[-1]

    def matching_error(self, vector: Tensor, g: Tensor, w: Tensor) -> float:
        """``||replay - g||^2 / ||g||^2`` of an encoded vector."""
        xs, ys, log_lr = self._split(vector)
        with torch.enable_grad():
            d = (replay(self.model, self.spec, w, xs, ys, log_lr) - w).detach()
        return float((d - g).pow(2).sum() / g.pow(2).sum().clamp_min(1e-30))

    def _encode(self, g: Tensor, w: Tensor, gen: torch.Generator, trace: list | None = None) -> Tensor:
        shape = (self.batches, self.batch_size)
        xs = torch.randn((*shape, *self.input_shape), generator=gen).to(g.device).requires_grad_(True)
        ys = torch.randn((*shape, self.num_classes), generator=gen).to(g.device).requires_grad_(True)
        log_lr = torch.tensor(math.log(self.init_step), device=g.device, requires_grad=True)
        opt = Adam([([xs, ys, log_lr], self.lr)])
        denom = g.pow(2).sum().clamp_min(1e-30)
        best, best_err = None, math.inf
        for _ in range(self.iters):
            err = (replay(self.model, self.spec, w, xs, ys, log_lr) - w - g).pow(2).sum() / denom
            e = float(err.detach())
            if e < best_err:
                best, best_err = (xs.detach().clone(), ys.detach().clone(), log_lr.detach().clone()), e
            if trace is not None:
                trace.append(e)
            opt.zero_grad()
            err.backward()
            opt.step()
        xs, ys, log_lr = best
        return torch.cat([xs.reshape(-1), ys.reshape(-1), log_lr.reshape(1)]).float()

    def _decode(self, vector: Tensor, w: Tensor) -> Tensor:
        xs, ys, log_lr = self._split(vector)
        with torch.enable_grad():
            return (replay(self.model, self.spec, w, xs, ys, log_lr) - w).detach()
