"""The Flower run config of the fedsynsam app: every :class:`~fedsynsam.config.Config` setting
(same names, same meaning as ``fedsynsam train``) plus the app's own settings.

Flower only accepts run-config overrides for keys the app's ``pyproject.toml`` declares, so
:func:`write_app` writes an app folder whose ``[tool.flwr.app.config]`` lists all of them with
their defaults; ``flwr run APP SUPERLINK --run-config my.toml`` then takes the same TOML file
as ``fedsynsam train --config my.toml``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import Config

__all__ = ["AppSettings", "FAULT_KINDS", "parse_faults", "from_run_config", "app_config", "write_app", "check_flower"]

FAULT_KINDS = ("raise", "flip", "truncate", "numel", "kind", "hang")


@dataclass
class AppSettings:
    """Settings of the Flower app that are not part of a run's identity."""

    out: str = "runs/flower"  # output folder on the SuperLink's machine (relative: to its working directory)
    round_timeout: float = 120.0  # seconds the server waits for a round's replies; later ones are dropped
    connect_timeout: float = 120.0  # seconds the server waits for one SuperNode per partition
    poll_interval: float = 0.1  # seconds between the server's pulls for replies (Flower's own: 3 s)
    discovery_batch: int = 10  # SuperNodes asked for their partition at a time when the run starts
    inject_faults: str = ""  # testing fault handling: "KIND:CLIENT@ROUND,..." (see parse_faults)
    resume: bool = False  # continue the run in ``out`` from its checkpoint (fedsynsam flower run --resume)

    def validate(self) -> AppSettings:
        if not isinstance(self.out, str) or not self.out:
            raise ValueError(f"out must be a folder path (a non-empty string); got {self.out!r}")
        for name in ("round_timeout", "connect_timeout", "poll_interval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < math.inf):
                raise ValueError(f"{name} must be a number of seconds > 0; got {v!r}")
            setattr(self, name, float(v))
        parse_faults(self.inject_faults)
        b = self.discovery_batch
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"discovery_batch must be an integer >= 1; got {b!r}")
        if not isinstance(self.resume, bool):
            raise ValueError(f"resume must be true or false; got {self.resume!r}")
        return self


def parse_faults(text: str) -> dict[tuple[int, int], str]:
    """``"flip:1@3,hang:2@4"`` -> ``{(3, 1): "flip", (4, 2): "hang"}`` (round is 1-based).

    Kinds: ``raise`` (the ClientApp raises), ``flip`` (one bit of the payload flipped),
    ``truncate`` (half the payload), ``numel`` (a valid payload one entry too long),
    ``kind`` (a valid payload of another compressor), ``hang`` (no reply within
    ``round_timeout``). For testing how a run survives broken clients.
    """
    if not isinstance(text, str):
        raise ValueError(f"inject_faults must be a string such as 'flip:1@3'; got {text!r}")
    faults = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        m = re.fullmatch(r"([a-z]+):(\d+)@(\d+)", item)
        if not m or m.group(1) not in FAULT_KINDS or int(m.group(3)) < 1:
            raise ValueError(
                f"inject_faults: {item!r} is not KIND:CLIENT@ROUND (KIND one of {', '.join(FAULT_KINDS)}, "
                "ROUND >= 1), e.g. 'flip:1@3,hang:2@4'"
            )
        faults[(int(m.group(3)), int(m.group(2)))] = m.group(1)
    return faults


def check_flower(cfg: Config) -> Config:
    """Refuse what the Flower app cannot run as the in-process trainer does."""
    if cfg.algorithm == "dppf":
        raise ValueError(
            "algorithm 'dppf' is not available on Flower: its pull-push step needs each worker's "
            "uncompressed model on the server (run it with fedsynsam train)"
        )
    if cfg.sfc_double_way:
        raise ValueError("sfc_double_way is not available on Flower (the clients would need to decode the broadcast)")
    return cfg


def from_run_config(run_config: dict) -> tuple[Config, AppSettings]:
    """Split a Flower run config into a validated :class:`Config` and :class:`AppSettings`."""
    values = {k.replace("-", "_"): v for k, v in dict(run_config).items()}
    app_names = {f.name for f in dataclasses.fields(AppSettings)}
    app = AppSettings(**{k: values.pop(k) for k in list(values) if k in app_names}).validate()
    for f in dataclasses.fields(Config):  # TOML has no null: "" stands for an unset data_dir, error_feedback
        if f.default is None and values.get(f.name) == "":
            values[f.name] = None
    cfg = Config.from_dict(values, source="run config").validate()
    return check_flower(cfg), app


def app_config(cfg: Config | None = None, app: AppSettings | None = None) -> dict:
    """The run config of ``cfg`` and ``app`` (defaults if ``None``), as TOML-able values."""
    cfg, app = cfg or Config(), app or AppSettings()
    values = {**cfg.to_dict(), **dataclasses.asdict(app)}
    return {k: "" if v is None else v for k, v in values.items()}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v)  # a TOML basic string


def write_app(folder: str | Path, cfg: Config | None = None, app: AppSettings | None = None) -> Path:
    """Write a Flower app folder (``pyproject.toml`` only; the code is the installed fedsynsam)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Written by fedsynsam.flower.settings.write_app: the fedsynsam Flower app.",
        "# Its components are the installed fedsynsam package; every SuperNode needs fedcomp[flower].",
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "fedsynsam-flower"',
        'version = "0.1.0"',
        'description = "FedSynSAM and the other fedsynsam algorithms with fedcomp-compressed uploads"',
        'license = "Apache-2.0"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "fedcomp"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "fedsynsam.flower.server_app:app"',
        'clientapp = "fedsynsam.flower.client_app:app"',
        "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{k} = {_toml_value(v)}" for k, v in app_config(cfg, app).items()]
    path = folder / "pyproject.toml"
    path.write_text("\n".join(lines) + "\n")
    return path
