"""Compressors that use the global model as the decompressor: 3SFC and FedSynth.

Both turn a client's update ``g`` (flat, float32) into a few synthetic samples; the
receiver, holding the same global model ``w``, turns them back into an update. The
floats travel as a fedcomp identity payload (so the wire format, checksum and exact
``nbytes`` are fedcomp's), and the byte count is exactly ``52 + 4 * floats``.

* :class:`ThreeSFC` (single-step synthetic features compressor): ``M`` samples
  ``(x~, y~)`` and a scale ``s``, so that ``g_hat = grad_w loss(f_w(x~), y~)`` points like
  ``g``: the encoder maximises ``|cos(g_hat, g)|`` (double backprop), keeping the best
  iterate; then ``s = <g_hat, g> / ||g_hat||^2``; error feedback keeps ``g - s * g_hat``.
  The receiver decodes ``s * g_hat``. Floats: ``M * (input size + classes) + 1``.
* :class:`FedSynth`: ``B`` batches of ``m`` samples with learnable labels and a
  learnable step size, such that ``B`` differentiable SGD steps from ``w`` land on
  ``w + g`` (the encoder minimises ``||replay - g||^2 / ||g||^2``, keeping the best). The
  receiver replays them. Floats: ``B * m * (input size + classes) + 1``.

Two choices shape how much of ``g`` the few floats carry (``benchmarks/sfc_encoders.py``
measures them on real client updates):

* ``encoder``: ``"lbfgs"`` (default; :func:`fedsynsam.optim.lbfgs`, ``iters`` = objective
  evaluations) or ``"adam"`` (``iters`` Adam steps at ``lr``).
* ``labels``: ``"raw"`` (default): ``y~`` are the targets of a cross-entropy as they are,
  ``loss = -mean_i sum_c y~_ic log_softmax(f_w(x~_i))_c``, so ``g_hat`` is linear in ``y~``
  (any combination of the per-class gradients); ``"softmax"``: the targets are
  ``softmax(y~)`` (a proper distribution; fewer directions reachable).

Each :meth:`ModelCompressor.compress` records ``last_cos``: the cosine between what the payload
decodes to and the vector it encodes (update plus residual), i.e. how much of it the payload
carried; the trainer logs its mean per round as ``encode_cos``.

Encoding is deterministic given a generator, and decoding recomputes exactly what
the encoder computed (same model, same ops), so sender and receiver agree to the bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import fedcomp
from fedcomp.flat import FlatSpec, unflatten

from .algorithms import soft_cross_entropy
from .optim import Adam, lbfgs

__all__ = [
    "ModelCompressor",
    "ThreeSFC",
    "FedSynth",
    "synthetic_gradient",
    "replay",
    "label_loss",
    "cosine",
    "ENCODERS",
    "LABELS",
    "ENCODER_DEFAULTS",
]

ENCODERS = ("lbfgs", "adam")
LABELS = ("raw", "softmax")
# (evaluations or steps, lr) of each encoder when the caller leaves them unset
ENCODER_DEFAULTS = {"lbfgs": (30, 1.0), "adam": (30, 0.1)}


def label_loss(logits: Tensor, y: Tensor, labels: str = "softmax") -> Tensor:
    """The synthetic samples' loss: ``-mean_i sum_c t_ic log_softmax(logits)_ic`` with targets
    ``t = y`` (``labels="raw"``) or ``t = softmax(y)`` (``"softmax"``). ``logits, y``: ``[m, C]``."""
    if labels == "softmax":
        return soft_cross_entropy(logits, y)
    return -(y * F.log_softmax(logits, dim=1)).sum(1).mean()


def synthetic_gradient(
    model: nn.Module, spec: FlatSpec, w: Tensor, x: Tensor, y: Tensor, *, create_graph=False, labels: str = "softmax"
):
    """``grad_w label_loss(f_w(x), y)`` as a flat ``[numel]`` tensor (``w`` flat). The default,
    softmax targets, is what FedSynSAM's synthetic set uses; 3SFC and FedSynth pass theirs."""
    w = w if w.requires_grad else w.detach().requires_grad_(True)
    loss = label_loss(functional_call(model, unflatten(w, spec), (x,)), y, labels)
    (g,) = torch.autograd.grad(loss, w, create_graph=create_graph)
    return g


def replay(model: nn.Module, spec: FlatSpec, w: Tensor, xs, ys, log_lr: Tensor, labels: str = "softmax") -> Tensor:
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
        grads = torch.autograd.grad(label_loss(logits, y, labels), params, create_graph=True, materialize_grads=True)
        params = [p - lr * g for p, g in zip(params, grads)]
    return torch.cat([p.reshape(-1) for p in params])


def _check_positive_int(name: str, value, lo: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}; got {value!r}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def cosine(a: Tensor, b: Tensor) -> float:
    """``<a, b> / (||a|| ||b||)`` of two flat tensors (0 when either is zero)."""
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-30))


class ModelCompressor:
    """Base of the model-as-decompressor compressors; per-key error-feedback residuals.

    ``model`` (its layout ``spec``) is the decompressor, evaluated at the flat global model;
    ``input_shape`` and ``num_classes`` shape the synthetic samples. ``encoder``, ``labels``:
    see the module docstring; ``iters`` and ``lr`` default to the encoder's
    (:data:`ENCODER_DEFAULTS`). ``seed`` numbers the random starts (one draw per call).

    Subclasses define ``floats``, ``_start`` (the random initial encoding), ``_loss`` (the
    encoder's objective of an encoding vector, to minimise), ``_finish`` (the sent vector of the
    best encoding) and ``_decode``. The encoder optimises one flat vector of the samples' floats.
    """

    kind = ""

    def __init__(
        self,
        model: nn.Module,
        spec: FlatSpec,
        input_shape,
        num_classes: int,
        *,
        iters: int | None = None,
        lr: float | None = None,
        encoder: str = "lbfgs",
        labels: str = "raw",
        error_feedback: bool = True,
        seed: int = 0,
    ):
        _check_choice("encoder", encoder, ENCODERS)
        _check_choice("labels", labels, LABELS)
        iters = ENCODER_DEFAULTS[encoder][0] if iters is None else iters
        lr = ENCODER_DEFAULTS[encoder][1] if lr is None else lr
        _check_positive_int("iters", iters)
        _check_positive_int("num_classes", num_classes, 2)
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite number > 0; got {lr!r}")
        self.model, self.spec = model, spec
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        self.iters, self.lr = iters, float(lr)
        self.encoder, self.labels = encoder, labels
        self.error_feedback = error_feedback
        self.seed = seed
        self.calls = 0
        self.residuals: dict[str, Tensor] = {}
        self.last_cos: float | None = None  # cosine of the last payload's decoding with its target

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
        """Encode ``delta`` (+ the residual of ``key``) at global model ``w``; updates the residual
        and :attr:`last_cos`."""
        # a fresh tensor: a row of the trainer's [clients, numel] buffer starts at an address whose
        # alignment changes how BLAS sums the dot products, hence the bits of the encoding
        g = delta.float().clone()
        if self.error_feedback:
            r = self.residuals.get(key)
            if r is not None:
                g += r
        vector = self.encode(g, w.detach(), self._generator())
        payload = fedcomp.Payload("identity", torch.float32, vector.numel(), {}, (vector,))
        decoded = self.decode(payload, w)
        self.last_cos = cosine(decoded, g)
        if self.error_feedback:
            self.residuals[key] = g - decoded
        return payload

    def encode(self, g: Tensor, w: Tensor, gen: torch.Generator, trace: list | None = None) -> Tensor:
        """The ``[floats()]`` float32 vector that stands for ``g`` (flat ``[numel]``) at ``w``: the
        encoder's best iterate from a random start drawn from ``gen``. ``trace`` (a list) gets
        the objective of every evaluation."""
        z0 = self._start(gen).to(g.device)

        def objective(z: Tensor) -> Tensor:
            value = self._loss(z, g, w)
            if trace is not None:
                trace.append(float(value.detach()))
            return value

        if self.encoder == "lbfgs":

            def evaluate(z):
                z = z.detach().requires_grad_(True)
                value = objective(z)
                (grad,) = torch.autograd.grad(value, z)
                return float(value.detach()), grad

            best, _, _ = lbfgs(evaluate, z0, max_evals=self.iters, lr=self.lr)
        else:
            z = z0.clone().requires_grad_(True)
            opt = Adam([([z], self.lr)])
            best, best_value = z0.clone(), math.inf
            for _ in range(self.iters):
                value = objective(z)
                if float(value.detach()) < best_value:
                    best, best_value = z.detach().clone(), float(value.detach())
                opt.zero_grad()
                value.backward()
                opt.step()
        return self._finish(best.detach(), g, w).float()

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
        **common,
    ):
        """``common``: :class:`ModelCompressor`'s keyword arguments."""
        super().__init__(model, spec, input_shape, num_classes, **common)
        _check_positive_int("samples", samples)
        self.samples = samples

    def floats(self) -> int:
        return self.samples * (self.input_size + self.num_classes) + 1

    def _split(self, vector: Tensor):
        m, d, c = self.samples, self.input_size, self.num_classes
        x = vector[: m * d].view(m, *self.input_shape)
        y = vector[m * d : m * (d + c)].view(m, c)
        return x, y, vector[m * (d + c) :]

    def _start(self, gen: torch.Generator) -> Tensor:
        # drawn on the CPU generator, then moved: the same samples on every device
        x = torch.randn((self.samples, *self.input_shape), generator=gen)
        y = torch.randn((self.samples, self.num_classes), generator=gen)
        return torch.cat([x.reshape(-1), y.reshape(-1)])

    def _gradient(self, z: Tensor, w: Tensor, create_graph: bool = False) -> Tensor:
        x, y, _ = self._split(z)
        return synthetic_gradient(self.model, self.spec, w, x, y, create_graph=create_graph, labels=self.labels)

    def _loss(self, z: Tensor, g: Tensor, w: Tensor) -> Tensor:
        g_hat = self._gradient(z, w, create_graph=True)
        return 1 - ((g_hat @ g) / (g_hat.norm() * g.norm()).clamp_min(1e-30)).abs()

    def _finish(self, z: Tensor, g: Tensor, w: Tensor) -> Tensor:
        g_hat = self._gradient(z, w)
        s = (g_hat @ g) / (g_hat @ g_hat).clamp_min(1e-30)
        return torch.cat([z, s.reshape(1)])

    def _decode(self, vector: Tensor, w: Tensor) -> Tensor:
        return self._split(vector)[2] * self._gradient(vector, w)


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
        init_step: float = 0.05,
        **common,
    ):
        """``init_step``: the step size the replay starts from; ``common``: :class:`ModelCompressor`'s
        keyword arguments."""
        super().__init__(model, spec, input_shape, num_classes, **common)
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

    def _replay(self, vector: Tensor, w: Tensor) -> Tensor:
        xs, ys, log_lr = self._split(vector)
        with torch.enable_grad():
            return replay(self.model, self.spec, w, xs, ys, log_lr, self.labels) - w

    def matching_error(self, vector: Tensor, g: Tensor, w: Tensor) -> float:
        """``||replay - g||^2 / ||g||^2`` of an encoded vector."""
        return float(self._loss(vector, g, w).detach())

    def _start(self, gen: torch.Generator) -> Tensor:
        shape = (self.batches, self.batch_size)
        xs = torch.randn((*shape, *self.input_shape), generator=gen)
        ys = torch.randn((*shape, self.num_classes), generator=gen)
        return torch.cat([xs.reshape(-1), ys.reshape(-1), torch.tensor([math.log(self.init_step)])])

    def _loss(self, z: Tensor, g: Tensor, w: Tensor) -> Tensor:
        return (self._replay(z, w) - g).pow(2).sum() / g.pow(2).sum().clamp_min(1e-30)

    def _finish(self, z: Tensor, g: Tensor, w: Tensor) -> Tensor:
        return z

    def _decode(self, vector: Tensor, w: Tensor) -> Tensor:
        return self._replay(vector, w).detach()
