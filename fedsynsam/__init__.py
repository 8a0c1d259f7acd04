"""fedsynsam: federated training with compressed uploads (fedcomp in the hot loop) and
sharpness-aware algorithms: FedAvg, FedSAM, MoFedSAM, FedLESAM and FedSynSAM.

Entry points: the ``fedsynsam`` command (:mod:`fedsynsam.cli`), :class:`fedsynsam.trainer.Trainer`
and :class:`fedsynsam.config.Config`.
"""

__all__ = ["Config", "Trainer"]


def __getattr__(name):
    # Lazy, so that `import fedsynsam` stays cheap and the CLI can report missing extras clearly.
    if name == "Config":
        from .config import Config

        return Config
    if name == "Trainer":
        from .trainer import Trainer

        return Trainer
    raise AttributeError(name)
