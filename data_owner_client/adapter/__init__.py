"""Adapters over the server's representations: one unit per kind, registered here.

- ``pema`` (:mod:`.pema`), the paper's: a low-rank map trained in two stages (reconstruction,
  then prediction) whose output the whole head reads.
- ``residual`` (:mod:`.residual`): a zero-initialised low-rank correction added to ``norm(x)``;
  equal to the PLM until trained.
- ``sequence`` (:mod:`.sequence`): a small causal transformer over the whole sequence of
  representations, also added to ``norm(x)``, with a pointer that copies source tokens.

Each kind's module holds its config (settings and their defaults), its ``nn.Module`` and an
:class:`AdapterKind` record; registering that record below is all a new kind needs elsewhere
(training, saving, loading, decoding and the CLI read the record and the module's interface,
:class:`AdapterModule`). The math is in docs/design.md, "Adapter kinds"; the directory format in
:mod:`.storage`.
"""

from data_owner_client.adapter import pema, residual, sequence
from data_owner_client.adapter.base import (
    FORMAT,
    FORMAT_VERSION,
    KINDS,
    AdapterConfig,
    AdapterError,
    AdapterFingerprintError,
    AdapterKind,
    AdapterModule,
    LowRankConfig,
    register_kind,
)
from data_owner_client.adapter.ensemble import Ensemble
from data_owner_client.adapter.pema import PemaAdapter, PemaConfig
from data_owner_client.adapter.residual import ResidualAdapter, ResidualConfig
from data_owner_client.adapter.sequence import SequenceAdapter, SequenceConfig
from data_owner_client.adapter.storage import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    adapter_tensors,
    build_adapter,
    check_fingerprint,
    load_adapter,
    load_adapters,
    read_adapter_config,
    save_adapter,
)

register_kind(pema.KIND)
register_kind(residual.KIND)
register_kind(sequence.KIND)

Adapter = AdapterModule  # any kind's module

__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "KINDS",
    "WEIGHTS_FILE",
    "Adapter",
    "AdapterConfig",
    "AdapterError",
    "AdapterFingerprintError",
    "AdapterKind",
    "AdapterModule",
    "Ensemble",
    "LowRankConfig",
    "PemaAdapter",
    "PemaConfig",
    "ResidualAdapter",
    "ResidualConfig",
    "SequenceAdapter",
    "SequenceConfig",
    "adapter_tensors",
    "build_adapter",
    "check_fingerprint",
    "load_adapter",
    "load_adapters",
    "read_adapter_config",
    "save_adapter",
    "register_kind",
]
