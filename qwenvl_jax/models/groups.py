"""Parameter groups: which parameters are the ViT, the adapter and the LLM (each family exports one).

The optimizer, freezing and layer-wise LR decay read these instead of naming any family's modules. Paths are
slash-joined tree keys (`visual/layers/attn/q/kernel` scanned, `visual/layers_3/...` unrolled).
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class ParamGroups:
  vision: str                  # regex: the vision tower (ViT)
  adapter: str                 # regex: vision -> LLM connector (resampler, merger, MLP projector)
  llm: str                     # regex: embeddings, decoder, LM head
  vit_layers: int              # blocks of the ViT (layer-wise LR decay)
  vit_embeddings: str          # regex: patch / position embeddings and pre-norm (decay ** (L + 1))
  vit_blocks: str = "visual/layers"   # path prefix of the ViT blocks: `<prefix>/` stacked, `<prefix>_<i>/` unrolled
  no_decay: str = r"(/bias$|/scale$|pos_embed$)"  # no weight decay: norms, biases and position tables

  def group_of(self, path: str) -> str:
    """'vision' | 'adapter' | 'llm' | 'other' for one parameter path."""
    for name in ("vision", "adapter", "llm"):
      if re.search(getattr(self, name), path):
        return name
    return "other"

  def block_index(self, path: str) -> int | None | str:
    """ViT block of an unrolled path (int), 'stacked' for the scanned blocks, None for anything else."""
    m = re.match(re.escape(self.vit_blocks) + r"_(\d+)/", path)
    if m:
      return int(m.group(1))
    return "stacked" if path.startswith(self.vit_blocks + "/") else None
