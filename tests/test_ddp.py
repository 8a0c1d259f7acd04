"""The DDP communication hook on 2 CPU processes over gloo."""

from __future__ import annotations

import os
import pickle
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import fedcomp
from fedcomp.ddp import CompressionState, compression_hook

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))


def _deep_model(seed: int) -> torch.nn.Module:
    """Big enough for DDP to make two buckets at ``bucket_cap_mb=0.005``."""
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(64, 1))


def _data(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(64, 32, generator=g)
    w = torch.linspace(-1, 1, 32)
    return x, (x @ w).unsqueeze(1) + 0.01 * torch.randn(64, 1, generator=g)


def _side_by_side(rank: int, hooked: DDP, plain: DDP, steps: int = 4, lr: float | None = None) -> list:
    """Per step, the gradients of ``hooked`` and of ``plain`` on the same batch (two lists of
    tensors); with ``lr``, both then take an SGD step of their own gradients."""
    out = []
    for step in range(steps):
        x, y = _data(rank, step)
        grads = []
        for m in (hooked, plain):
            m.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            grads.append([p.grad.clone() for p in m.parameters()])
        out.append(grads)
        if lr is not None:
            with torch.no_grad():
                for m in (hooked, plain):
                    for p in m.parameters():
                        p -= lr * p.grad
    return out


def _train(rank: int, module: torch.nn.Module, state: CompressionState, steps: int = 60) -> dict:
    """``steps`` of SGD of ``module`` in DDP (small buckets) through the hook with ``state``:
    the losses, the final parameters and the pickled state."""
    model = DDP(module, bucket_cap_mb=0.005)
    model.register_comm_hook(state, compression_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for step in range(steps):
        x, y = _data(rank, step)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {
        "losses": losses,
        "params": [p.detach().clone() for p in model.parameters()],
        "state": pickle.dumps(state),
    }


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        # 1. Identity through the hook == DDP's own allreduce, to the bit.
        hooked, plain = DDP(_model(0), bucket_cap_mb=0.005), DDP(_model(0), bucket_cap_mb=0.005)
        state = CompressionState(fedcomp.Identity(), error_feedback=False, start_iter=1, min_compression_rate=1)
        hooked.register_comm_hook(state, compression_hook)
        identity_equal = [
            all(torch.equal(a, b) for a, b in zip(*grads)) for grads in _side_by_side(rank, hooked, plain, lr=0.05)
        ]
        # 2. TopK and Sign with error feedback: the loss falls, fewer bytes are sent.
        results = {"identity_equal": identity_equal, "identity_compressed": state.compressed_buckets}
        for name, comp in (("topk", fedcomp.TopK(0.05)), ("sign", fedcomp.Sign(block=256))):
            results[name] = _train(rank, _model(1), CompressionState(comp, error_feedback=True, start_iter=2))
        # 3. PowerSGD at full rank (nothing to lose) through several buckets == DDP's allreduce.
        full, plain = DDP(_deep_model(2), bucket_cap_mb=0.005), DDP(_deep_model(2), bucket_cap_mb=0.005)
        pstate = CompressionState(
            fedcomp.PowerSGD(64, min_compression_rate=0, seed=rank), error_feedback=False, start_iter=1
        )
        full.register_comm_hook(pstate, compression_hook)
        gaps = [
            max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(*grads))
            for grads in _side_by_side(rank, full, plain)
        ]
        results["powersgd_full"] = {"gaps": gaps, "buckets": sorted(pstate.compressor.q)}
        # 4. PowerSGD rank 1 with error feedback, several buckets: trains, every rank the same model.
        lstate = CompressionState(fedcomp.PowerSGD(1, seed=rank), error_feedback=True, start_iter=2)
        results["powersgd"] = _train(rank, _deep_model(1), lstate)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # every rank past its last collective before any closes its connections
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_identity_hook_equals_allreduce_exactly(ddp_results):
    for r in ddp_results:
        assert r["identity_equal"] == [True] * 4
        assert r["identity_compressed"] > 0  # the compressed path did run (after start_iter)


@pytest.mark.parametrize("name, min_ratio", [("topk", 3), ("sign", 10)])
def test_compression_with_error_feedback_trains_and_saves_bytes(ddp_results, name, min_ratio):
    for r in ddp_results:
        losses = r[name]["losses"]
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert last < 0.5 * first, (first, last)
        state = pickle.loads(r[name]["state"])
        assert state.process_group is None
        assert state.compressed_buckets > 0 and state.allreduced_buckets > 0
        assert state.compression_ratio > min_ratio
        assert set(state.compressor.residuals) == {f"bucket{i}" for i in range(len(state.compressor.residuals))}
    # both ranks hold the same model: each applied the same averaged, decoded update
    for a, b in zip(ddp_results[0][name]["params"], ddp_results[1][name]["params"]):
        assert torch.equal(a, b)


def test_powersgd_at_full_rank_equals_allreduce_through_several_buckets(ddp_results):
    for r in ddp_results:
        assert max(r["powersgd_full"]["gaps"]) < 1e-4, r["powersgd_full"]["gaps"]
        assert len(r["powersgd_full"]["buckets"]) >= 2  # the matrices sat in more than one bucket


def test_powersgd_with_error_feedback_trains_on_every_rank_alike(ddp_results):
    for r in ddp_results:
        losses = r["powersgd"]["losses"]
        assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
        state = pickle.loads(r["powersgd"]["state"])
        assert state.process_group is None and state.seed_synced
        assert state.compression_ratio > 3
        assert len(state.compressor.compressor.q) >= 2  # warm-start factors of several buckets
        assert state.compressor.compressor.seed == 0  # rank 0's seed, adopted by rank 1
    for a, b in zip(ddp_results[0]["powersgd"]["params"], ddp_results[1]["powersgd"]["params"]):
        assert torch.equal(a, b)


def test_one_scale_sign_in_the_hook_warns():
    with pytest.warns(UserWarning, match=r"one sign scale per DDP bucket .* Use Sign\(block=256\)"):
        CompressionState(fedcomp.Sign())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CompressionState(fedcomp.Sign(block=256))


def test_state_rejects_bad_arguments():
    with pytest.raises(ValueError, match="start_iter must be an int >= 1"):
        CompressionState(fedcomp.TopK(0.1), start_iter=0)
    with pytest.raises(ValueError, match="min_compression_rate must be a finite number >= 0"):
        CompressionState(fedcomp.TopK(0.1), min_compression_rate=-1)
    with pytest.raises(TypeError, match="compressor must be a fedcomp Compressor"):
        CompressionState("topk")
