"""fedsynsam: federated training with compressed uploads and sharpness-aware minimization.

The trainer is being built on top of :mod:`fedcomp`; this package is a placeholder
namespace until then and exports nothing.
"""
