"""Settings of a data-parallel run (:class:`DPConfig`), validated with messages that name them."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import (
    F32_MAX,
    Settings,
    check_bools,
    check_choices,
    check_data,
    check_device,
    check_positive_ints,
    check_qsgd_error_feedback,
    check_qsgd_levels,
    check_ranges,
    check_seed,
)
from ..data import DATASETS
from ..models import MODELS

__all__ = ["DPConfig", "METHODS", "DP_COMPRESSORS", "DP_PARTITIONS", "DP_NOT_IDENTITY"]

METHODS = ("ddp", "localsgd", "dppf")
DP_COMPRESSORS = ("none", "topk", "sign", "qsgd", "powersgd")
DP_PARTITIONS = ("iid", "dirichlet")
# settings a checkpoint may be resumed with other values of (a longer run, another device or timeout)
DP_NOT_IDENTITY = ("steps", "device", "timeout", "measure", "measure_samples")


@dataclass
class DPConfig(Settings):
    """Every setting of a data-parallel run. ``fedsynsam dp --help`` lists them as flags.

    The number of workers is the process group's world size (``--nproc`` or torchrun's), not a
    setting; a run resumes only at the world size it started with.
    """

    method: str = "dppf"  # ddp | localsgd | dppf
    compressor: str = "none"  # none | topk | sign | qsgd | powersgd: what a synchronisation sends
    ratio: float = 0.01  # kept fraction for topk
    # local SGD and the DDP hook: an EF residual per worker (None: on but for qsgd); DPPF always carries
    # what a payload left out in its published position (fedsynsam.dp.sync), with or without it
    error_feedback: bool | None = None
    sign_block: int = 512  # entries per scale of the sign compressor
    sign_majority: bool = False  # sign: average by majority vote instead of the mean of the decoded signs
    qsgd_levels: int = 4
    qsgd_bucket: int = 512
    powersgd_rank: int = 2  # PowerSGD: rank of each matrix's factors (--rank)
    dataset: str = "mnist5k"
    data_dir: str | None = None
    model: str = "cnn"
    partition: str = "iid"  # iid (equal random shards) | dirichlet (label skew, alpha)
    alpha: float = 0.1
    seed: int = 0
    steps: int = 1000  # SGD steps of every worker
    sync_every: int = 4  # tau: local steps between synchronisations (ddp: between records)
    batch_size: int = 32  # per worker and step
    lr: float = 0.05
    weight_decay: float = 0.0
    dppf_alpha: float = 0.1  # pull toward the average, in (0, 1]
    dppf_lambda: float = 0.02  # push away from it: the workers settle about lambda/alpha from the average
    measure: bool = True  # at the end: lambda_max, Hessian trace, valley width and IMV of the average
    measure_samples: int = 1024  # the fixed training subset those measures use
    eval_every: int = 5  # synchronisations between test evaluations (the last one is always evaluated)
    checkpoint_every: int = 25  # synchronisations between checkpoints (and the last)
    timeout: float = 120.0  # seconds a collective waits for a peer before the run stops with an error
    device: str = "auto"  # auto | cpu | cuda (each rank takes cuda:LOCAL_RANK); gloo on CPU, NCCL on CUDA

    def validate(self) -> DPConfig:
        """Raise ValueError naming the setting and its valid range or choices."""
        check_choices(
            self,
            {
                "method": METHODS,
                "compressor": DP_COMPRESSORS,
                "dataset": DATASETS,
                "model": MODELS,
                "partition": DP_PARTITIONS,
            },
        )
        check_positive_ints(
            self,
            "steps sync_every batch_size sign_block qsgd_bucket powersgd_rank eval_every checkpoint_every "
            "measure_samples",
        )
        check_seed(self.seed)
        check_qsgd_levels(self.qsgd_levels)
        if self.steps % self.sync_every:
            raise ValueError(
                f"steps must be a multiple of sync_every={self.sync_every} (the run ends on a "
                f"synchronisation); got {self.steps}"
            )
        check_ranges(
            self,
            ("ratio", 0.0, 1.0, False),
            ("alpha", 0.0, F32_MAX, False),
            ("lr", 0.0, F32_MAX, False),
            ("weight_decay", 0.0, F32_MAX, True),
            ("dppf_alpha", 0.0, 1.0, False),
            ("dppf_lambda", 0.0, F32_MAX, True),
            ("timeout", 0.0, F32_MAX, False),
        )
        if self.error_feedback is None:  # resolved here, so a run's saved config says which
            self.error_feedback = self.compressor != "qsgd"
        check_bools(self, "error_feedback sign_majority measure")
        check_qsgd_error_feedback(self)
        if self.sign_majority and self.compressor != "sign":
            raise ValueError(f"sign_majority needs compressor 'sign'; got compressor {self.compressor!r}")
        check_device(self.device)
        check_data(self.dataset, self.data_dir)
        return self
