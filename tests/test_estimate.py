"""The estimate diagnostic (cosine of each perturbation estimate with grad F(w^t)) and FedSynSAM's
gradient-matching objective."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from _support import distill_digits, strip_seconds, tiny_config
from torch import nn

from fedcomp.flat import flatten
from fedsynsam import algorithms as alg
from fedsynsam.config import Config
from fedsynsam.data import load_dataset
from fedsynsam.estimate import ESTIMATES, cosine, federation_gradient, parse_diagnose, summarize
from fedsynsam.rounds import generator
from fedsynsam.synthetic import displacements, distill, gradient_matching_loss
from fedsynsam.trainer import Trainer

DIGITS = load_dataset("digits")


def _explicit_full_gradient(tr: Trainer, w: torch.Tensor) -> torch.Tensor:
    """grad of the mean CE over every client's samples, in one autograd call (no chunks)."""
    idx = torch.cat(tr.client_index)
    tr.load_flat(w)
    params = list(tr.model.parameters())
    loss = F.cross_entropy(tr.model(tr.data.x_train[idx]), tr.data.y_train[idx])
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def test_federation_gradient_equals_one_autograd_call_over_all_samples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 7), nn.ReLU(), nn.Linear(7, 10))
    w, spec = flatten(model)
    x, y = DIGITS.x_train[:301], DIGITS.y_train[:301]
    loss = F.cross_entropy(model(x), y)
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    for chunk in (1, 64, 300, 301, 1000):  # the last chunk short, one chunk, one sample a chunk
        torch.testing.assert_close(federation_gradient(model, spec, w, x, y, chunk=chunk), expected)
    with pytest.raises(ValueError, match="at least one sample"):
        federation_gradient(model, spec, w, x[:0], y[:0])


def test_cosine_edge_cases():
    a = torch.tensor([1.0, 0.0])
    assert cosine(a, torch.tensor([2.0, 0.0])) == 1.0
    assert cosine(a, torch.tensor([-3.0, 0.0])) == -1.0
    assert cosine(a, torch.tensor([0.0, 5.0])) == 0.0
    assert cosine(None, a) is None
    assert cosine(torch.zeros(2), a) is None
    assert cosine(torch.tensor([float("inf"), 0.0]), a) is None


@pytest.mark.parametrize("algorithm", ["fedlesam", "fedsam", "fedsynsam"])
def test_the_diagnostic_equals_an_explicit_computation(algorithm):
    cfg = tiny_config(algorithm=algorithm, compressor="topk", rounds=4, diagnose="estimate")
    tr = Trainer(cfg, dataset=DIGITS)
    for _ in range(cfg.rounds):
        plan_w = tr.state.w.clone()
        u_prev = None if tr.state.u_prev is None else tr.state.u_prev.clone()
        syn = tr.state.synthetic
        t = tr.state.round
        clients = torch.randperm(cfg.clients, generator=generator(cfg.seed, t, 0))[: cfg.per_round].sort().values
        rec = tr.run_round()
        g = _explicit_full_gradient(tr, plan_w)
        est = rec["estimate"]
        assert set(est) == set(ESTIMATES)
        if u_prev is None:
            assert est["previous_update"] is None
        else:
            expected = float(F.cosine_similarity(-u_prev.double(), g.double(), dim=0))
            assert est["previous_update"] == pytest.approx(expected, abs=1e-5)
        # the minibatch estimate: each sampled client's first batch at w^t, as local training draws it
        cosines = []
        for c in clients.tolist():
            idx = tr.client_index[c]
            order = torch.randperm(len(idx), generator=generator(cfg.seed, t, 1, c))
            batch = idx[order[: cfg.batch_size]]
            tr.load_flat(plan_w)
            params = list(tr.model.parameters())
            loss = F.cross_entropy(tr.model(tr.data.x_train[batch]), tr.data.y_train[batch])
            gb = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, params)])
            cosines.append(float(F.cosine_similarity(gb.double(), g.double(), dim=0)))
        assert est["minibatch"] == pytest.approx(sum(cosines) / len(cosines), abs=1e-5)
        if syn is None:
            assert est["synthetic"] is None
        else:
            tr.load_flat(plan_w)
            params = list(tr.model.parameters())
            gs = torch.autograd.grad(alg.soft_cross_entropy(tr.model(syn.images), syn.label_logits), params)
            gs = torch.cat([x.reshape(-1) for x in gs])
            assert est["synthetic"] == pytest.approx(float(F.cosine_similarity(gs, g, dim=0)), abs=1e-5)
        expected_eps = {"fedsam": "minibatch", "fedlesam": "previous_update"}.get(algorithm)
        if algorithm == "fedsynsam":
            expected_eps = "synthetic" if syn is not None else "previous_update"
        assert est["eps"] == est[expected_eps]
        assert est["oracle"] is None  # not asked for


@pytest.mark.parametrize("compressor", ["topk", "none"])
def test_the_diagnostic_changes_no_other_field(tmp_path, compressor):
    """Off by default; on, every other field of every record, the summary's accuracy and bytes and the
    final weights are those of the run without it (only ``seconds``, wall-clock, may differ)."""
    base = dict(algorithm="fedsynsam", compressor=compressor, rounds=5, eval_every=2)
    plain = Trainer(tiny_config(**base), tmp_path / "off", dataset=DIGITS)
    off = plain.run(progress=False)
    probed = Trainer(tiny_config(**base, diagnose="estimate,oracle"), tmp_path / "on", dataset=DIGITS)
    on = probed.run(progress=False)
    assert all("estimate" not in r for r in off)
    measured = [r for r in on if "estimate" in r]
    assert [r["round"] for r in measured] == [2, 4, 5]  # the evaluated rounds
    assert any(r["estimate"]["oracle"] is not None for r in measured)
    assert strip_seconds([{k: v for k, v in r.items() if k != "estimate"} for r in on]) == strip_seconds(off)
    assert torch.equal(plain.state.w, probed.state.w)
    s_off = json.loads((tmp_path / "off" / "summary.json").read_text())
    s_on = json.loads((tmp_path / "on" / "summary.json").read_text())
    for key in ("final_test_acc", "total_uplink_bytes", "total_downlink_bytes", "distillations"):
        assert s_on[key] == s_off[key]
    assert "estimate" not in s_off and s_on["estimate"]["eps"]["rounds"] == 3
    assert (tmp_path / "on" / "estimate_cosine.png").is_file()
    assert not (tmp_path / "off" / "estimate_cosine.png").exists()


def test_resume_reproduces_the_diagnostic_and_the_new_default(tmp_path):
    """The default objective (gradient matching) and the oracle set resume bit for bit."""
    cfg = tiny_config(algorithm="fedsynsam", compressor="topk", rounds=6, diagnose="estimate,oracle")
    assert cfg.validate().syn_objective == "gradient"
    whole = Trainer(cfg, tmp_path / "a", dataset=DIGITS).run(progress=False)
    Trainer(cfg, tmp_path / "b", dataset=DIGITS).run(progress=False, stop_after=3)
    resumed = Trainer(cfg, tmp_path / "b", dataset=DIGITS)
    rest = resumed.run(progress=False, resume=True)
    assert strip_seconds(rest) == strip_seconds(whole)
    assert resumed.probe.oracle is not None
    # turning the diagnostic on for the rest of a run is allowed: it is not part of the run's identity
    Trainer(cfg, tmp_path / "c", dataset=DIGITS).run(progress=False, stop_after=3)
    off = tiny_config(algorithm="fedsynsam", compressor="topk", rounds=6)
    rest_off = Trainer(off, tmp_path / "c", dataset=DIGITS).run(progress=False, resume=True)
    assert [r["test_acc"] for r in rest_off] == [r["test_acc"] for r in whole]


def test_summarize_gives_medians_and_quartiles_of_the_measured_rounds():
    recs = [{"round": i, "estimate": {"eps": v, "synthetic": None}} for i, v in enumerate([0.1, 0.5, 0.2, 0.9])]
    recs.append({"round": 9})  # an unmeasured round
    out = summarize(recs)
    assert set(out) == {"eps"}
    assert out["eps"]["median"] == pytest.approx(0.35)
    assert out["eps"]["rounds"] == 4
    assert out["eps"]["q1"] == pytest.approx(0.175) and out["eps"]["q3"] == pytest.approx(0.6)


# -- the gradient-matching objective ------------------------------------------------------------


def _tiny_double_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    w, spec = flatten(model)
    return model, w, spec


def test_gradient_matching_loss_gradient_against_finite_differences():
    """The objective's derivative in the images and label logits (a double backprop), by gradcheck."""
    model, w, spec = _tiny_double_model()
    gen = torch.Generator().manual_seed(1)
    points = [w + 0.1 * torch.randn(w.shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    targets = [torch.randn(w.shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    images = torch.randn(4, 1, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(x, y):
        return gradient_matching_loss(model, spec, points, targets, x, y)

    assert torch.autograd.gradcheck(f, (images, labels), eps=1e-6, atol=1e-6)
    # and its value: the mean of 1 - cos over the points
    value = float(f(images, labels).detach())
    explicit = []
    for p, d in zip(points, targets):
        from fedsynsam.syncomp import synthetic_gradient

        g = synthetic_gradient(model, spec, p, images.detach(), labels.detach())
        explicit.append(1 - float(F.cosine_similarity(g, d, dim=0)))
    assert value == pytest.approx(sum(explicit) / 3, rel=1e-12)


def test_displacements_are_the_negated_span_differences():
    traj = [torch.full((3,), float(i * i)) for i in range(5)]
    d = displacements(traj, 2)
    assert len(d) == 3
    for s, ds in enumerate(d):
        assert torch.equal(ds, traj[s] - traj[s + 2])


@pytest.fixture(scope="module")
def fedavg_trajectory():
    """Global models of 14 FedAvg rounds on digits (moderately non-IID)."""
    tr = Trainer(Config(rounds=14, alpha=1.0, local_steps=5), dataset=DIGITS)
    tr.run(progress=False)
    return tr


def _distill_gradient(tr, models, iters, targets=None):
    return distill_digits(tr, models, iters, objective="gradient", targets=targets, unroll=1)


def test_gradient_matching_points_the_next_models_gradient_like_grad_f(fedavg_trajectory):
    """Distilled from rounds 0..10 of the trajectory (targets at 0..8), the set's gradient at the
    unseen rounds 11..13 points like the full-data gradient there: better than -u^{t-1}, and the
    oracle (targets grad F) at least as well. The matching loss falls."""
    tr = fedavg_trajectory
    models = tr.state.trajectory[:11]
    syn, losses = _distill_gradient(tr, models, 60)
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10, losses
    oracle_targets = [_explicit_full_gradient(tr, w) for w in models[:-2]]
    oracle, _ = _distill_gradient(tr, models, 60, targets=oracle_targets)
    ours, prev, ceiling = [], [], []
    for t in (11, 12, 13):
        w = tr.state.trajectory[t]
        g = _explicit_full_gradient(tr, w)
        ours.append(cosine(tr.synthetic_direction(syn, w), g))
        ceiling.append(cosine(tr.synthetic_direction(oracle, w), g))
        prev.append(cosine(tr.state.trajectory[t - 1] - w, g))  # -u^{t-1}
    print(f"gradient matching {ours}, oracle {ceiling}, -u^(t-1) {prev}")
    assert min(ours) > 0.5 and sum(ours) > sum(prev) + 0.3, (ours, prev)
    assert sum(ceiling) >= sum(ours) - 0.05, (ceiling, ours)


def test_the_gradient_objective_checks_its_targets(fedavg_trajectory):
    tr = fedavg_trajectory
    with pytest.raises(ValueError, match="targets must have 9 tensors"):
        _distill_gradient(tr, tr.state.trajectory[:11], 1, targets=[tr.state.w])
    with pytest.raises(ValueError, match="unknown syn_objective 'matching'"):
        distill(
            tr.model, tr.spec, tr.state.trajectory, input_shape=(1, 8, 8), num_classes=10, per_class=1, unroll=1,
            span=2, iters=1, lr_images=0.1, lr_labels=0.1, lr_step=0.1, init_step=0.1,
            generator=torch.Generator(), version=1, objective="matching",
        )  # fmt: skip


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"syn_objective": "matching"}, "unknown syn_objective 'matching'; choose one of gradient, sam-gradient, traj"),
        ({"syn_points": 0}, "syn_points must be an integer >= 1; got 0"),
        ({"syn_points": -3}, "syn_points must be an integer >= 1; got -3"),
        ({"syn_iters": -1}, "syn_iters must be an integer >= 1; got -1"),
        ({"syn_refresh_iters": 0}, "syn_refresh_iters must be an integer >= 1; got 0"),
        ({"diagnose": "sharpness"}, "unknown diagnose 'sharpness'; choose from estimate, oracle"),
        ({"diagnose": "oracle"}, "diagnose 'oracle' is a column of the estimate diagnostic"),
        ({"diagnose": 3}, "diagnose must be a comma-separated string"),
        (
            {"diagnose": "estimate,oracle", "syn_objective": "trajectory"},
            "diagnose 'oracle' matches gradients: it needs syn_objective 'gradient' or 'sam-gradient'",
        ),
    ],
)
def test_bad_settings_give_one_line_errors(overrides, match):
    with pytest.raises(ValueError, match=match) as info:
        Config(**overrides).validate()
    assert "\n" not in str(info.value)


def test_objective_defaults_resolve_per_objective():
    grad, traj = Config().validate(), Config(syn_objective="trajectory").validate()
    assert (grad.syn_iters, grad.syn_refresh_iters) == (100, 20)
    assert (traj.syn_iters, traj.syn_refresh_iters) == (60, 8)
    assert Config(syn_iters=7).validate().syn_iters == 7
    assert parse_diagnose(" estimate , oracle ") == ("estimate", "oracle") and parse_diagnose("") == ()


def test_cli_diagnose_flag_and_compare_column(tmp_path, capsys):
    from fedsynsam.cli import main

    flags = ["--rounds", "3", "--clients", "4", "--per-round", "2", "--local-steps", "2", "--alpha", "0.5"]
    flags += ["--syn-min-models", "2", "--syn-span", "1", "--syn-window", "4", "--syn-period", "1"]
    flags += ["--syn-iters", "2", "--syn-refresh-iters", "1", "--syn-per-class", "1", "--diagnose", "estimate"]
    code = main(
        ["compare", "--algorithms", "fedavg,fedsynsam", "--compressors", "topk", "--seeds", "0", "--quiet"]
        + flags
        + ["--out", str(tmp_path)]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "median cos(ε, ∇F)" in out
    fedavg_row = next(line for line in out.splitlines() if line.startswith("| fedavg"))
    fedsynsam_row = next(line for line in out.splitlines() if line.startswith("| fedsynsam"))
    assert fedavg_row.rstrip(" |").endswith("—")  # FedAvg perturbs along nothing
    assert not math.isnan(float(fedsynsam_row.split("|")[-2].split("±")[0]))
    assert (tmp_path / "estimate_cosine.png").is_file()
    header = (tmp_path / "results.csv").read_text().splitlines()[0]
    assert header.endswith("eps_cosine_mean,eps_cosine_std")


def test_sam_gradient_matches_at_the_perturbed_points(fedavg_trajectory):
    """With every eps zero it is the gradient objective to the bit; without the eps it is refused."""
    tr = fedavg_trajectory
    models = tr.state.trajectory[:11]
    plain, _ = _distill_gradient(tr, models, 3)
    zeros = [torch.zeros_like(w) for w in models[:-1]]
    same, _ = distill_digits(tr, models, 3, objective="sam-gradient", unroll=1, perturbations=zeros)
    assert torch.equal(plain.images, same.images) and torch.equal(plain.label_logits, same.label_logits)
    shifted = [torch.full_like(w, 1e-3) for w in models[:-1]]
    moved, _ = distill_digits(tr, models, 3, objective="sam-gradient", unroll=1, perturbations=shifted)
    assert not torch.equal(plain.images, moved.images)
    with pytest.raises(ValueError, match="sam-gradient needs the eps of each of 9 starts; got none"):
        distill_digits(tr, models, 1, objective="sam-gradient", unroll=1)


def test_sam_gradient_keeps_each_rounds_eps_and_resumes_bit_for_bit(tmp_path):
    cfg = tiny_config(algorithm="fedsynsam", compressor="topk", rounds=6, syn_objective="sam-gradient")
    whole = Trainer(cfg, tmp_path / "a", dataset=DIGITS)
    records = whole.run(progress=False)
    st = whole.state
    assert len(st.perturbations) == len(st.trajectory) - 1 == cfg.syn_window - 1
    for eps in st.perturbations:  # each of norm rho, or zero (FedLESAM's first round has no eps)
        norm = float(eps.norm())
        assert norm == 0.0 or norm == pytest.approx(cfg.rho, rel=1e-5)
    Trainer(cfg, tmp_path / "b", dataset=DIGITS).run(progress=False, stop_after=3)
    rest = Trainer(cfg, tmp_path / "b", dataset=DIGITS).run(progress=False, resume=True)
    assert strip_seconds(rest) == strip_seconds(records)
