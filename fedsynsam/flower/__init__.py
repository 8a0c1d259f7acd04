"""fedsynsam on Flower's deployment runtime (SuperLink + SuperNodes over the network).

The same rounds as the in-process :class:`fedsynsam.trainer.Trainer`, split where the
network splits them (:mod:`fedsynsam.rounds`):

* :mod:`.server_app` -- the ServerApp: the trainer's server half (sampling, the trajectory
  and ``D_syn``, ``fedcomp.aggregate``, checkpoints, the same outputs as ``fedsynsam train``);
  each round's sampled clients are Flower messages.
* :mod:`.client_app` -- the ClientApp: the client half (local steps with the algorithm's
  perturbation, then error-feedback compression); the payload goes up as its fedcomp
  bytes; the EF residual stays on the node (context state, or ``state-dir`` on disk) and is
  never sent.
* :mod:`.node` -- what a ``train`` message does on a SuperNode; :mod:`.worker` -- the
  SuperNode's warm worker process that runs it (Flower starts a process per message).
* :mod:`.protocol` -- what the messages hold, and the checks on every reply.
* :mod:`.settings` -- the run config: every :class:`~fedsynsam.config.Config` setting plus
  the app's own (``out``, ``round_timeout``, ``connect_timeout``, ``resume``, ...).
* :mod:`.secure` -- TLS certificates and SuperNode keys (``fedsynsam flower tls`` / ``node-key``).
* :mod:`.deploy` -- a local federation (one SuperLink, N SuperNodes on 127.0.0.1 with free
  ports) that the tests and ``fedsynsam flower demo`` start and always tear down.

Needs the ``flower`` extra: ``pip install "fedcomp[flower]"``.
"""

from __future__ import annotations

__all__ = ["RECORD", "partition_of", "require_flwr"]

RECORD = "fedsynsam"  # the name of the ConfigRecord every fedsynsam message carries


def partition_of(node_config, clients) -> int:
    """This node's ``partition-id``, checked against its ``num-partitions`` and the run's ``clients``."""
    try:
        client = int(node_config["partition-id"])
        parts = int(node_config["num-partitions"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"this SuperNode needs --node-config 'partition-id=I num-partitions=N'; got {dict(node_config)}"
        ) from None
    if parts != int(clients) or not 0 <= client < parts:
        raise ValueError(
            f"node-config partition-id={client} num-partitions={parts} does not fit the run's clients={clients}"
        )
    return client


def require_flwr():
    """Import and return ``flwr``, or raise ImportError saying how to install it."""
    try:
        import flwr
    except ImportError as e:  # pragma: no cover - the test extra pulls flwr
        raise ImportError(
            'fedsynsam.flower needs Flower: pip install "fedcomp[flower]" (flwr>=1.42; no Ray needed)'
        ) from e
    return flwr
