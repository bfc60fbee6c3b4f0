"""δ-mem stateful adapters (arXiv 2605.12357): a tiny fp32 associative memory per attention layer,
written by a gated delta rule as tokens pass and read back as low-rank corrections to the query and the
attention output of a frozen base. The weights are shared; the state is per sequence (per instance).
"""

from mintd.engine.delta_mem.adapter import DeltaMemAdapter, DeltaMemLayer
from mintd.engine.delta_mem.hooks import DeltaMemContext, blank_adapter, create_adapter, install_delta_mem
from mintd.engine.delta_mem.run import DeltaMemRun
from mintd.engine.delta_mem.scan import chunked_scan, reference_scan, step
from mintd.engine.delta_mem.segments import segment_attention
from mintd.lora_config import DeltaMemSpec

__all__ = [
    "DeltaMemAdapter",
    "DeltaMemContext",
    "DeltaMemLayer",
    "DeltaMemRun",
    "DeltaMemSpec",
    "blank_adapter",
    "chunked_scan",
    "create_adapter",
    "install_delta_mem",
    "reference_scan",
    "segment_attention",
    "step",
]
