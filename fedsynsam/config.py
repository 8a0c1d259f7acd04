"""The run configuration: defaults, validation with clear messages, TOML files."""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch

import fedcomp

from .algorithms import ALGORITHMS
from .data import DATASETS, EMBEDDED
from .estimate import parse_diagnose
from .models import MODELS
from .syncomp import ENCODER_DEFAULTS, ENCODERS, LABELS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "Config",
    "Settings",
    "COMPRESSORS",
    "PARTITIONS",
    "PERTURBATION_MODES",
    "SYN_ITERS",
    "EXECUTION_ONLY",
    "NOT_IDENTITY",
    "load_toml",
    "resolve_device",
]

COMPRESSORS = ("none", "topk", "randk", "sign", "qsgd", "powersgd", "3sfc", "fedsynth")
PARTITIONS = ("dirichlet", "shards")
PERTURBATION_MODES = ("client", "server")
# (first, refresh) Adam iterations of each synthetic-set objective when the config leaves them unset
SYN_ITERS = {"gradient": (100, 20), "sam-gradient": (100, 20), "trajectory": (60, 8)}
F32_MAX = 3.4028234663852886e38  # settings enter float32 arithmetic: larger ones overflow


class Settings:
    """What every run configuration dataclass shares: dict round trip with unknown keys refused."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> Settings:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(known)}")
        cfg = cls(**values)
        for name, f in known.items():  # ints given where floats are expected are fine; coerce them
            if (
                f.type in ("float", "float | None")
                and isinstance(getattr(cfg, name), int)
                and not isinstance(getattr(cfg, name), bool)
            ):
                setattr(cfg, name, float(getattr(cfg, name)))
        return cfg


@dataclass
class Config(Settings):
    """Every setting of a run. ``fedsynsam train --help`` lists them as flags."""

    algorithm: str = "fedavg"
    compressor: str = "none"
    ratio: float = 0.01  # kept fraction for topk / randk
    # EF residual per client (ignored for compressor "none"); None: on for every compressor but
    # QSGD, which is unbiased and whose EF diverges unless qsgd_levels > sqrt(qsgd_bucket)
    error_feedback: bool | None = None
    sign_block: int = 512  # entries per scale of the sign compressor
    qsgd_levels: int = 4
    qsgd_bucket: int = 512
    powersgd_rank: int = 2  # PowerSGD: rank of each matrix's factors (--rank)
    rounds: int = 100
    clients: int = 20
    per_round: int = 5
    alpha: float = 0.1  # Dirichlet concentration (partition "dirichlet")
    partition: str = "dirichlet"
    shards_per_client: int = 2  # partition "shards"
    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "mlp"
    seed: int = 0
    local_steps: int = 10  # K
    batch_size: int = 32
    lr: float = 0.05  # eta, local
    server_lr: float = 1.0  # eta_g
    weight_decay: float = 0.0
    rho: float = 0.05  # SAM radius
    mofedsam_alpha: float = 0.9  # MoFedSAM mixing weight of the local gradient
    perturbation: str = "client"  # FedSynSAM: "client" or "server"
    syn_per_class: int = 10
    syn_min_models: int = 10  # L_min
    syn_period: int = 10  # P
    syn_window: int = 20  # global models kept
    syn_span: int = 2  # M
    syn_unroll: int = 10  # N
    syn_objective: str = "gradient"  # "gradient" (matching), "sam-gradient" (at w + eps) or "trajectory"
    syn_points: int = 5  # gradient matching: trajectory points per Adam iteration
    # Adam iterations of the first distillation (from noise) and of each refresh (warm-started
    # from the previous set); None: the objective's default (SYN_ITERS)
    syn_iters: int | None = None
    syn_refresh_iters: int | None = None
    syn_lr_images: float = 0.05
    syn_lr_labels: float = 0.05
    syn_lr_step: float = 0.01
    sfc_samples: int = 1  # 3SFC: synthetic samples M
    sfc_encoder: str = "lbfgs"  # 3SFC's encoder: "lbfgs" or "adam" (fedsynsam.syncomp)
    sfc_labels: str = "raw"  # 3SFC's label targets: "raw" (as they are) or "softmax"
    # the encoder's objective evaluations (L-BFGS) or steps (Adam) and its (first) step size;
    # None: the encoder's default (ENCODER_DEFAULTS: L-BFGS 30 at 1.0, Adam 30 at 0.1)
    sfc_iters: int | None = None
    sfc_lr: float | None = None
    sfc_double_way: bool = False  # 3SFC: the server also compresses the aggregate it broadcasts
    fedsynth_batches: int = 1  # FedSynth: replayed batches B
    fedsynth_batch_size: int = 1
    fedsynth_encoder: str = "lbfgs"  # as sfc_encoder, sfc_labels, sfc_iters, sfc_lr, for FedSynth
    fedsynth_labels: str = "raw"
    fedsynth_iters: int | None = None
    fedsynth_lr: float | None = None
    dppf_alpha: float = 0.1  # DPPF pull
    dppf_lambda: float = 0.01  # DPPF push; the workers settle about lambda/alpha from the mean
    eval_every: int = 1
    checkpoint_every: int = 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N; not part of a run's identity (resume on either)
    # diagnostics recorded in every round's record (simulation only; they never change training):
    # "estimate" = the cosine of each perturbation estimate with grad F(w^t); "estimate,oracle" adds
    # the oracle synthetic set's (fedsynsam.estimate)
    diagnose: str = ""

    def unused(self) -> tuple[str, ...]:
        """The settings of the compressors this run does not use (``sfc_*`` unless it uses 3SFC,
        ``fedsynth_*`` unless FedSynth, ``powersgd_*`` unless PowerSGD): they cannot change it,
        so a checkpoint or finished run matches a config that differs only in them (runs saved
        before the encoders' defaults changed keep resuming)."""
        prefixes = tuple(
            p
            for p, used in (("sfc_", "3sfc"), ("fedsynth_", "fedsynth"), ("powersgd_", "powersgd"))
            if self.compressor != used
        )
        return tuple(f.name for f in fields(self) if f.name.startswith(prefixes)) if prefixes else ()

    def validate(self) -> Config:
        """Raise ValueError naming the setting and its valid range or choices."""
        check_choices(
            self,
            {
                "algorithm": ALGORITHMS,
                "compressor": COMPRESSORS,
                "dataset": DATASETS,
                "model": MODELS,
                "partition": PARTITIONS,
                "perturbation": PERTURBATION_MODES,
                "syn_objective": tuple(SYN_ITERS),
                "sfc_encoder": ENCODERS,
                "sfc_labels": LABELS,
                "fedsynth_encoder": ENCODERS,
                "fedsynth_labels": LABELS,
            },
        )
        for prefix in ("sfc", "fedsynth"):  # resolved here, so a run's saved config says which
            encoder = getattr(self, f"{prefix}_encoder")
            if getattr(self, f"{prefix}_iters") is None:
                setattr(self, f"{prefix}_iters", ENCODER_DEFAULTS[encoder][0])
            if getattr(self, f"{prefix}_lr") is None:
                setattr(self, f"{prefix}_lr", ENCODER_DEFAULTS[encoder][1])
        if self.syn_iters is None:  # resolved here, so a run's saved config says how many
            self.syn_iters = SYN_ITERS[self.syn_objective][0]
        if self.syn_refresh_iters is None:
            self.syn_refresh_iters = SYN_ITERS[self.syn_objective][1]
        check_positive_ints(
            self,
            "rounds clients per_round shards_per_client local_steps batch_size sign_block qsgd_bucket powersgd_rank "
            "syn_per_class syn_min_models syn_period syn_window syn_span syn_unroll syn_iters syn_refresh_iters "
            "syn_points eval_every checkpoint_every sfc_samples sfc_iters fedsynth_batches fedsynth_batch_size "
            "fedsynth_iters",
        )
        check_seed(self.seed)
        check_qsgd_levels(self.qsgd_levels)
        if self.per_round > self.clients:
            raise ValueError(f"per_round must be in [1, clients={self.clients}]; got {self.per_round}")
        check_ranges(
            self,
            ("ratio", 0.0, 1.0, False),
            ("alpha", 0.0, F32_MAX, False),
            ("lr", 0.0, F32_MAX, False),
            ("server_lr", 0.0, F32_MAX, False),
            ("rho", 0.0, F32_MAX, True),
            ("weight_decay", 0.0, F32_MAX, True),
            ("mofedsam_alpha", 0.0, 1.0, True),
            ("syn_lr_images", 0.0, F32_MAX, False),
            ("syn_lr_labels", 0.0, F32_MAX, True),
            ("syn_lr_step", 0.0, F32_MAX, True),
            ("sfc_lr", 0.0, F32_MAX, False),
            ("fedsynth_lr", 0.0, F32_MAX, False),
            ("dppf_alpha", 0.0, 1.0, False),
            ("dppf_lambda", 0.0, F32_MAX, True),
        )
        if self.error_feedback is None:  # resolved here, so a run's saved config says which
            self.error_feedback = self.compressor != "qsgd"
        check_bools(self, "error_feedback sfc_double_way")
        check_qsgd_error_feedback(self)
        if self.sfc_double_way and self.compressor != "3sfc":
            raise ValueError(f"sfc_double_way needs compressor '3sfc'; got compressor {self.compressor!r}")
        if self.syn_window <= self.syn_span:
            raise ValueError(f"syn_window must be > syn_span={self.syn_span}; got {self.syn_window}")
        if self.syn_min_models <= self.syn_span or self.syn_min_models > self.syn_window:
            raise ValueError(
                f"syn_min_models must be in [syn_span+1={self.syn_span + 1}, syn_window={self.syn_window}]; "
                f"got {self.syn_min_models}"
            )
        if "oracle" in parse_diagnose(self.diagnose) and self.syn_objective == "trajectory":
            raise ValueError(
                "diagnose 'oracle' matches gradients: it needs syn_objective 'gradient' or 'sam-gradient'; "
                f"got {self.syn_objective!r}"
            )
        check_device(self.device)
        check_data(self.dataset, self.data_dir)
        return self


# -- checks shared by every run configuration (Config, fedsynsam.dp.DPConfig) ---------------------


def check_choices(cfg, choices: dict) -> None:
    """Each ``cfg.<name>`` must be one of ``choices[name]``."""
    for name, valid in choices.items():
        if getattr(cfg, name) not in valid:
            raise ValueError(f"unknown {name} {getattr(cfg, name)!r}; choose one of {', '.join(valid)}")


def check_positive_ints(cfg, names: str) -> None:
    """Each of the space-separated ``names`` must be an integer >= 1 (not a bool)."""
    for name in names.split():
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {v!r}")


def check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32); got {seed!r}")


def check_qsgd_levels(levels) -> None:
    if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= 32768:
        raise ValueError(f"qsgd_levels must be an integer in [1, 32768]; got {levels!r}")


def check_ranges(cfg, *specs: tuple) -> None:
    """``specs``: ``(name, lo, hi, closed_lo)``: ``cfg.<name>`` must be a number in ``(lo, hi]``
    (``[lo, hi]`` when ``closed_lo``)."""
    for name, lo, hi, closed_lo in specs:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{name} must be a number; got {v!r}")
        ok = (v >= lo if closed_lo else v > lo) and v <= hi and v == v
        if not ok:
            bracket = "[" if closed_lo else "("
            top = "3.4e38 (the largest float32)" if hi == F32_MAX else hi
            raise ValueError(f"{name} must be in {bracket}{lo}, {top}]; got {v!r}")


def check_bools(cfg, names: str) -> None:
    for name in names.split():
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name} must be true or false; got {getattr(cfg, name)!r}")


def check_qsgd_error_feedback(cfg) -> None:
    """QSGD with error feedback diverges unless ``qsgd_levels > sqrt(qsgd_bucket)``."""
    if cfg.compressor != "qsgd" or not cfg.error_feedback:
        return
    bound = fedcomp.QSGD(cfg.qsgd_levels, cfg.qsgd_bucket).variance_bound()
    if bound >= 1:
        raise ValueError(
            f"error_feedback with qsgd needs qsgd_levels > sqrt(qsgd_bucket) = {cfg.qsgd_bucket**0.5:.3g}: "
            f"QSGD's variance bound at qsgd_levels={cfg.qsgd_levels}, qsgd_bucket={cfg.qsgd_bucket} is "
            f"{bound:.3g} >= 1, and the residual then grows until the model is NaN; "
            "set error_feedback = false (QSGD is unbiased) or raise qsgd_levels"
        )


def check_device(device) -> None:
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {device!r}")


def check_data(dataset: str, data_dir) -> None:
    if data_dir is not None and not isinstance(data_dir, str):
        raise ValueError(f"data_dir must be a path (a string); got {data_dir!r}")
    if dataset not in EMBEDDED and not data_dir:
        raise ValueError(f"dataset {dataset!r} is read from files: set data_dir (--data-dir)")


# Settings that choose where a run executes, not what it computes: a finished run matches a
# config that differs only in them.
EXECUTION_ONLY = ("device",)
# Settings a checkpoint may be resumed with other values of (a longer run, another device).
NOT_IDENTITY = ("rounds", "diagnose", *EXECUTION_ONLY)


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when this torch sees a GPU, else the CPU. ``cuda`` without CUDA: ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ValueError(
                f"device {name!r} needs a CUDA GPU, but torch.cuda.is_available() is False "
                f"(torch {torch.__version__} is {build}); use --device cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def load_toml(path: str | Path) -> dict:
    """Settings from a TOML file: top-level keys named like :class:`Config` fields (``-`` or ``_``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None
    return {k.replace("-", "_"): v for k, v in data.items()}
