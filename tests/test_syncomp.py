"""3SFC, FedSynth and DPPF: encoders, error feedback, payload sizes, the pull-push dynamics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fedcomp
from fedcomp.flat import flatten
from fedsynsam import algorithms as alg
from fedsynsam.config import Config
from fedsynsam.data import load_dataset
from fedsynsam.models import build_model
from fedsynsam.optim import lbfgs
from fedsynsam.syncomp import ENCODER_DEFAULTS, FedSynth, ThreeSFC, label_loss
from fedsynsam.trainer import Trainer

DIGITS = load_dataset("digits")


@pytest.fixture(scope="module")
def setting():
    """A small MLP, its flat weights w, and a real client update g (a few SGD steps on 64 samples)."""
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10)
    w, spec = flatten(model)
    w = w.clone()
    x, y = DIGITS.x_train[:64], DIGITS.y_train[:64]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    g = flatten(model)[0] - w
    return model, spec, w, g


def _cos(a, b) -> float:
    return float(F.cosine_similarity(a, b, dim=0))


def test_3sfc_cosine_is_far_above_a_random_direction(setting):
    model, spec, w, g = setting
    comp = ThreeSFC(model, spec, (1, 8, 8), 10, samples=1, iters=60, lr=0.1, error_feedback=False)
    decoded = comp.decode(comp.compress(g, "c", w), w)
    gen = torch.Generator().manual_seed(0)
    rand = max(abs(_cos(torch.randn(g.numel(), generator=gen), g)) for _ in range(20))
    assert _cos(decoded, g) > 0.3 and _cos(decoded, g) > 10 * rand, (_cos(decoded, g), rand)


def test_lbfgs_encoder_fits_where_adam_does_not(setting):
    """At the same 30 evaluations of the objective, L-BFGS with raw label targets carries a larger
    share of the update than the former default (Adam, softmax targets), from every start."""
    model, spec, w, g = setting
    floor = 0.485

    def cosines(**kwargs):
        out = []
        for seed in range(4):
            comp = ThreeSFC(model, spec, (1, 8, 8), 10, iters=30, error_feedback=False, seed=seed, **kwargs)
            comp.compress(g, "c", w)
            out.append(comp.last_cos)
        return out

    new, old = cosines(encoder="lbfgs", labels="raw"), cosines(encoder="adam", labels="softmax")
    assert min(new) > floor > max(old), (new, old)


def test_last_cos_is_the_cosine_of_the_decoded_payload_with_its_target(setting):
    model, spec, w, g = setting
    comp = ThreeSFC(model, spec, (1, 8, 8), 10, iters=5)
    comp.compress(g, "c", w)  # leaves a residual r
    target = g + comp.residuals["c"]
    payload = comp.compress(g, "c", w)
    decoded = comp.decode(payload, w)
    assert comp.last_cos == pytest.approx(_cos(decoded, target), abs=1e-6)
    assert comp.last_cos > 0  # the least-squares scale points the decoding along the target


def test_raw_labels_are_cross_entropy_with_the_targets_as_given():
    gen = torch.Generator().manual_seed(0)
    logits, y = torch.randn(3, 10, generator=gen), torch.randn(3, 10, generator=gen)
    assert torch.allclose(label_loss(logits, y, "raw"), F.cross_entropy(logits, y))
    assert torch.allclose(label_loss(logits, y, "softmax"), F.cross_entropy(logits, y.softmax(1)))


def test_lbfgs_minimises_a_quadratic_and_keeps_the_best_point():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    h = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64)  # positive definite, condition ~ 100s
    target = torch.randn(6, generator=gen, dtype=torch.float64)
    seen = []

    def evaluate(z):
        d = z - target
        seen.append(float(0.5 * d @ h @ d))
        return seen[-1], h @ d

    best, loss, evals = lbfgs(evaluate, torch.zeros(6, dtype=torch.float64), max_evals=60)
    assert evals == len(seen) <= 60
    assert loss == min(seen) and loss < 1e-12 * seen[0]
    assert torch.allclose(best, target, atol=1e-5)
    again = lbfgs(evaluate, torch.zeros(6, dtype=torch.float64), max_evals=60)
    assert torch.equal(again[0], best)  # deterministic
    with pytest.raises(ValueError, match="max_evals must be an integer >= 1"):
        lbfgs(evaluate, torch.zeros(6), max_evals=0)


def test_3sfc_error_feedback_residual_is_g_minus_s_ghat(setting):
    model, spec, w, g = setting
    comp = ThreeSFC(model, spec, (1, 8, 8), 10, samples=2, iters=10, lr=0.1)
    p1 = comp.compress(g, "c", w)
    decoded = comp.decode(fedcomp.Payload.from_bytes(p1.to_bytes()), w)
    assert torch.equal(comp.residuals["c"], g - decoded)
    # the scale is the least-squares one: the residual is orthogonal to the decoded direction
    assert abs(float(comp.residuals["c"] @ decoded)) < 1e-4 * float(g.norm() * decoded.norm())
    before = comp.residuals["c"].clone()
    p2 = comp.compress(g, "c", w)
    assert torch.allclose(comp.residuals["c"], g + before - comp.decode(p2, w))


@pytest.mark.parametrize("encoder, iters, lr", [("adam", 80, 0.05), ("lbfgs", 60, None)])
def test_fedsynth_replay_approaches_the_update(setting, encoder, iters, lr):
    model, spec, w, g = setting
    comp = FedSynth(
        model, spec, (1, 8, 8), 10, batches=2, batch_size=4, iters=iters, lr=lr, encoder=encoder, error_feedback=False
    )
    trace = []
    vector = comp.encode(g, w, torch.Generator().manual_seed(0), trace=trace)
    assert len(trace) <= iters + (encoder == "adam")
    assert min(trace[-10:]) < 0.7 * trace[0], (trace[0], min(trace[-10:]))
    assert comp.matching_error(vector, g, w) == pytest.approx(min(trace), rel=1e-5)
    payload = comp.compress(g, "c", w)
    assert torch.equal(comp.decode(payload, w), comp.decode(fedcomp.Payload.from_bytes(payload.to_bytes()), w))


@pytest.mark.parametrize(
    "make, floats",
    [
        (lambda m, s: ThreeSFC(m, s, (1, 8, 8), 10, samples=1), 1 * (64 + 10) + 1),
        (lambda m, s: ThreeSFC(m, s, (1, 8, 8), 10, samples=3), 3 * (64 + 10) + 1),
        (lambda m, s: FedSynth(m, s, (1, 8, 8), 10, batches=2, batch_size=5), 2 * 5 * (64 + 10) + 1),
    ],
)
def test_payload_sizes_equal_the_formula(setting, make, floats):
    model, spec, w, g = setting
    comp = make(model, spec)
    comp.iters = 2
    payload = comp.compress(g, "c", w)
    assert comp.floats() == floats
    assert payload.nbytes == len(payload.to_bytes()) == comp.wire_bytes() == 52 + 4 * floats


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"samples": 0}, "samples must be an integer >= 1"),
        ({"iters": 0}, "iters must be an integer >= 1"),
        ({"lr": -1.0}, "lr must be a finite number > 0"),
        ({"lr": float("nan")}, "lr must be a finite number > 0"),
        ({"encoder": "sgd"}, "unknown encoder 'sgd'; choose one of lbfgs, adam"),
        ({"labels": "onehot"}, "unknown labels 'onehot'; choose one of raw, softmax"),
    ],
)
def test_3sfc_rejects_bad_hyperparameters(setting, kwargs, match):
    model, spec, _, _ = setting
    with pytest.raises(ValueError, match=match):
        ThreeSFC(model, spec, (1, 8, 8), 10, **kwargs)


def test_fedsynth_rejects_bad_hyperparameters(setting):
    model, spec, _, _ = setting
    with pytest.raises(ValueError, match="batches must be an integer >= 1"):
        FedSynth(model, spec, (1, 8, 8), 10, batches=0)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        FedSynth(model, spec, (1, 8, 8), 10, batch_size=-2)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"dppf_alpha": 0.0}, r"dppf_alpha must be in \(0.0, 1.0\]"),
        ({"dppf_lambda": -1.0}, r"dppf_lambda must be in \[0.0, 3.4e38 \(the largest float32\)\]"),
        ({"sfc_samples": 0}, "sfc_samples must be an integer >= 1"),
        ({"fedsynth_iters": 0}, "fedsynth_iters must be an integer >= 1"),
        ({"sfc_double_way": True, "compressor": "topk"}, "sfc_double_way needs compressor '3sfc'"),
        ({"sfc_encoder": "newton"}, "unknown sfc_encoder 'newton'; choose one of lbfgs, adam"),
        ({"fedsynth_labels": "hard"}, "unknown fedsynth_labels 'hard'; choose one of raw, softmax"),
        ({"sfc_iters": -1}, "sfc_iters must be an integer >= 1"),
        ({"sfc_lr": 0.0}, "sfc_lr must be in"),
    ],
)
def test_config_rejects_bad_hyperparameters(overrides, match):
    with pytest.raises(ValueError, match=match):
        Config(**overrides).validate()


def test_config_resolves_the_encoder_defaults():
    cfg = Config(compressor="3sfc").validate()
    assert (cfg.sfc_encoder, cfg.sfc_labels) == ("lbfgs", "raw")
    assert (cfg.sfc_iters, cfg.sfc_lr) == ENCODER_DEFAULTS["lbfgs"]
    cfg = Config(compressor="fedsynth", fedsynth_encoder="adam", fedsynth_iters=7).validate()
    assert (cfg.fedsynth_iters, cfg.fedsynth_lr) == (7, ENCODER_DEFAULTS["adam"][1])


def test_pull_push_spread_settles_at_lambda_over_alpha():
    """Convex toy: f(x) = x_0^2 / 2 has a flat valley along x_1. Workers take gradient steps,
    then pull-push around their mean; their distance to the mean settles at lambda / alpha."""
    alpha, lam = 0.2, 0.05
    gen = torch.Generator().manual_seed(0)
    workers = [torch.randn(2, generator=gen) * 3 for _ in range(4)]
    for _ in range(300):
        workers = [x - 0.1 * torch.tensor([x[0], 0.0]) for x in workers]  # local gradient step
        mean = torch.stack(workers).mean(0)
        workers = [alg.pull_push(x, mean, alpha, lam) for x in workers]
    mean = torch.stack(workers).mean(0)
    spreads = [float((x - mean).norm()) for x in workers]
    assert all(s == pytest.approx(lam / alpha, rel=0.05) for s in spreads), spreads


def test_pull_push_without_a_direction_only_pulls():
    x = torch.ones(3)
    assert torch.equal(alg.pull_push(x, x.clone(), 0.5, 1.0), x)


@pytest.mark.parametrize(
    "overrides",
    [
        {"compressor": "3sfc"},
        {"compressor": "3sfc", "sfc_double_way": True},
        {"compressor": "fedsynth"},
        {"algorithm": "dppf"},
        {"algorithm": "dppf", "compressor": "topk"},
    ],
)
def test_trainer_runs_and_resumes_with_the_new_systems(tmp_path, overrides):
    cfg = Config(rounds=4, clients=4, per_round=2, local_steps=2, sfc_iters=3, fedsynth_iters=3, **overrides)
    full = Trainer(cfg, tmp_path / "full", dataset=DIGITS)
    records = full.run(progress=False)
    first = Trainer(cfg, tmp_path / "split", dataset=DIGITS)
    first.run(progress=False, stop_after=2)
    resumed = Trainer(cfg, tmp_path / "split", dataset=DIGITS).run(progress=False, resume=True)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(resumed) == strip(records)
    if cfg.compressor in ("3sfc", "fedsynth"):
        per_client = full.uplink.wire_bytes()
        assert all(r["uplink_bytes"] == 2 * per_client for r in records)
        low = 0 if cfg.compressor == "3sfc" else -1  # 3SFC's scale makes it >= 0; a replay may point away
        assert all(low <= r["encode_cos"] <= 1 for r in records)
    else:
        assert not any("encode_cos" in r for r in records)
    assert all(("downlink_encode_cos" in r) == bool(cfg.sfc_double_way) for r in records)
    if cfg.sfc_double_way:
        assert all(r["downlink_bytes"] == 2 * full.downlink.wire_bytes() for r in records)
    if cfg.algorithm == "dppf":
        assert all(r["worker_spread"] > 0 for r in records)
        assert all(r["downlink_bytes"] == 2 * fedcomp.Identity().wire_bytes(full.numel) for r in records)


def test_unused_compressor_settings_do_not_block_a_resume(tmp_path):
    """A run saved before the encoders' defaults changed (sfc_lr 0.1 then) resumes when it does
    not use 3SFC; a 3SFC run whose encoder settings differ is refused, naming them."""
    base = dict(rounds=3, clients=4, per_round=2, local_steps=2)
    old = Config(compressor="topk", sfc_lr=0.1, fedsynth_iters=7, **base).validate()
    Trainer(old, tmp_path / "topk", dataset=DIGITS).run(progress=False, stop_after=1)
    now = Config(compressor="topk", **base).validate()
    assert "sfc_lr" in now.unused() and "fedsynth_iters" in now.unused() and "ratio" not in now.unused()
    records = Trainer(now, tmp_path / "topk", dataset=DIGITS).run(progress=False, resume=True)
    assert [r["round"] for r in records] == [1, 2, 3]
    old = Config(compressor="3sfc", sfc_iters=3, sfc_lr=0.5, **base).validate()
    Trainer(old, tmp_path / "3sfc", dataset=DIGITS).run(progress=False, stop_after=1)
    now = Config(compressor="3sfc", sfc_iters=3, **base).validate()
    assert "sfc_lr" not in now.unused() and "fedsynth_lr" in now.unused()
    with pytest.raises(ValueError, match="sfc_lr"):
        Trainer(now, tmp_path / "3sfc", dataset=DIGITS).run(progress=False, resume=True)


def test_the_synthetic_set_keeps_softmax_targets(setting):
    """FedSynSAM's D_syn shares synthetic_gradient with 3SFC; 3SFC's raw targets must not leak
    into it (its label logits are the logits of soft labels)."""
    from torch.func import functional_call

    from fedcomp.flat import unflatten
    from fedsynsam.synthetic import gradient_matching_loss

    model, spec, w, g = setting
    gen = torch.Generator().manual_seed(3)
    images, logits = torch.randn(3, 1, 8, 8, generator=gen), torch.randn(3, 10, generator=gen)
    wt = w.clone().requires_grad_(True)
    loss = alg.soft_cross_entropy(functional_call(model, unflatten(wt, spec), (images,)), logits)
    (g_syn,) = torch.autograd.grad(loss, wt)
    got = float(gradient_matching_loss(model, spec, [w], [g], images, logits))
    assert got == pytest.approx(1 - _cos(g_syn, g), abs=1e-6)
