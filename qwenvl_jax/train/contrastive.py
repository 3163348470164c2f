"""The contrastive alignment stage (InternVL's stage 1), for every family: image-text pairs pull together.

    image [N, ...] --family's vision tower, tokens averaged (`pooled_vit`)--> [N, W] --img_proj--> [N, E] --L2-->
    caption ids [N, L] --family's LLM, hidden states pooled (last real token | mean)--> [N, D] --txt_proj--> --L2-->
    logits = scale * img @ txt.T  [N, N] (+ bias for SigLIP)

Losses: CLIP's symmetric InfoNCE (cross-entropy over the rows and over the columns of the logits, pair i's partner
on the diagonal) with a learnable temperature (scale = exp(t), t initialised to log(1 / 0.07), scale clipped at
100, as CLIP), or SigLIP's sigmoid loss (every pair a binary decision, label +1 on the diagonal and -1 elsewhere,
summed and divided by N; t initialised to log(10), bias to -10, as the SigLIP paper).

Negatives come from the whole global batch: the step is jitted over the global arrays (rows sharded over the mesh's
data axes), so `img @ txt.T` is [N_global, N_global] and XLA gathers the other shards' embeddings, not only the local
ones (tests/test_contrastive.py checks a 4-device mesh against one device). For the same reason micro-batching would
change the loss (fewer negatives), so gradient accumulation is refused in this mode.

Parameters: the family's own tree plus `contrastive/{img_proj, txt_proj, logit_scale[, logit_bias]}`, so freezing,
parameter groups and layer-wise decay read the same paths as in the generative stages, and a generative stage starts
from a contrastive workdir by leaving `contrastive/` behind (`init.source=checkpoint`).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwenvl_jax.data.pairs import IMAGE_PREFIX
from qwenvl_jax.nn.layers import Dense

LOSSES = ("clip", "siglip")
TEXT_POOLING = ("last", "mean")
MAX_LOGIT_SCALE = 100.0  # CLIP clips the learned scale here


@dataclasses.dataclass(frozen=True)
class ContrastiveSpec:
  loss: str = "clip"             # clip | siglip
  embed_dim: int = 256           # width of the shared embedding space
  text_pooling: str = "last"     # last (the last real token: it has seen the whole caption) | mean
  init_temperature: float = 0.07  # clip: scale = 1 / temperature at the start

  def validate(self):
    if self.loss not in LOSSES:
      raise ValueError(f"contrastive.loss {self.loss!r}: expected one of {LOSSES}")
    if self.text_pooling not in TEXT_POOLING:
      raise ValueError(f"contrastive.text_pooling {self.text_pooling!r}: expected one of {TEXT_POOLING}")
    if self.embed_dim < 1 or not 0 < self.init_temperature:
      raise ValueError("contrastive.embed_dim must be positive and contrastive.init_temperature > 0")


class ContrastiveHead(nn.Module):
  """Projections into the shared space, the learned temperature (and SigLIP's bias). Methods: `image` ([N, W] ->
  [N, E] normalised), `text` ([N, D] -> [N, E] normalised), `scale_bias`, and `__call__` (all three)."""
  spec: ContrastiveSpec

  def setup(self):
    s = self.spec
    self.img_proj = Dense((s.embed_dim,), ("vit_embed", "contrastive"), use_bias=False,
                          kernel_init=nn.initializers.lecun_normal())
    self.txt_proj = Dense((s.embed_dim,), ("embed", "contrastive"), use_bias=False,
                          kernel_init=nn.initializers.lecun_normal())
    t0 = math.log(1 / s.init_temperature) if s.loss == "clip" else math.log(10.0)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(t0), (), jnp.float32)
    if s.loss == "siglip":
      self.logit_bias = self.param("logit_bias", nn.initializers.constant(-10.0), (), jnp.float32)

  def image(self, features: jax.Array) -> jax.Array:
    return _l2(self.img_proj(features.astype(jnp.float32)))

  def text(self, features: jax.Array) -> jax.Array:
    return _l2(self.txt_proj(features.astype(jnp.float32)))

  def scale_bias(self) -> tuple[jax.Array, jax.Array]:
    if self.spec.loss == "clip":
      return jnp.minimum(jnp.exp(self.logit_scale), MAX_LOGIT_SCALE), jnp.zeros((), jnp.float32)
    return jnp.exp(self.logit_scale), self.logit_bias

  def __call__(self, image_features: jax.Array, text_features: jax.Array):
    """[N, W], [N, D] -> (image embeddings [N, E], text embeddings [N, E], scale [], bias []) in float32."""
    return (self.image(image_features), self.text(text_features)) + self.scale_bias()


def _l2(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + 1e-12)


def clip_loss(img: jax.Array, txt: jax.Array, scale: jax.Array) -> jax.Array:
  """Symmetric InfoNCE: mean of the image->text and text->image cross-entropies; img, txt [N, E] normalised."""
  logits = scale * img @ txt.T
  labels = jnp.arange(img.shape[0])
  i2t = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], axis=1).mean()
  t2i = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=0), labels[None, :], axis=0).mean()
  return (i2t + t2i) / 2


def siglip_loss(img: jax.Array, txt: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  """Sigmoid loss: -sum over all pairs of log sigmoid(z * (scale * img.txt + bias)), z = +1 on the diagonal, -1 off
  it, divided by N."""
  logits = scale * img @ txt.T + bias
  z = 2 * jnp.eye(img.shape[0]) - 1
  return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / img.shape[0]


def pooled_text(hidden: jax.Array, mask: jax.Array, how: str) -> jax.Array:
  """hidden [N, L, D], mask [N, L] (real tokens first) -> [N, D]: the last real token's state, or the mean."""
  if how == "last":
    last = jnp.maximum(jnp.sum(mask, axis=1) - 1, 0)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
  w = mask.astype(hidden.dtype)[..., None]
  return (hidden * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1)


def _family(params: dict) -> dict:
  return {k: v for k, v in params.items() if k != "contrastive"}


def image_embeddings(model, head: ContrastiveHead, params: dict, batch: dict, rng=None) -> jax.Array:
  """`image/<arg>` arrays of the family's `pooled_vit` in `batch` -> [N, E] normalised. With a `rng` (training) the
  vision tower's stochastic parts run (InternViT's drop path)."""
  images = {k[len(IMAGE_PREFIX):]: v for k, v in batch.items() if k.startswith(IMAGE_PREFIX)}
  train = {} if rng is None else {"deterministic": False, "rngs": {"dropout": rng}}
  features = model.apply({"params": _family(params)}, **images, method="pooled_vit", **train)
  return head.apply({"params": params["contrastive"]}, features, method="image")


def text_embeddings(model, head: ContrastiveHead, params: dict, text_ids: jax.Array, text_mask: jax.Array):
  """Caption ids [N, L] (real tokens first, `text_mask` [N, L]) -> [N, E] normalised."""
  hidden = model.apply({"params": _family(params)}, text_ids, attention_mask=text_mask, inference=False,
                       return_hidden=True)
  features = pooled_text(hidden, text_mask, head.spec.text_pooling)
  return head.apply({"params": params["contrastive"]}, features, method="text")


def embed(model, head: ContrastiveHead, params: dict, batch: dict, rng=None):
  """-> (image embeddings [N, E], text embeddings [N, E], scale, bias). batch: `image/<arg>` arrays of the family's
  `pooled_vit`, text_ids [N, L], text_mask [N, L]; rng: training (see `image_embeddings`)."""
  scale, bias = head.apply({"params": params["contrastive"]}, method="scale_bias")
  return (image_embeddings(model, head, params, batch, rng),
          text_embeddings(model, head, params, batch["text_ids"], batch["text_mask"]), scale, bias)


def contrastive_loss(model, head: ContrastiveHead, params: dict, batch: dict, rng=None) -> jax.Array:
  img, txt, scale, bias = embed(model, head, params, batch, rng)
  return clip_loss(img, txt, scale) if head.spec.loss == "clip" else siglip_loss(img, txt, scale, bias)


def init_head(head: ContrastiveHead, vit_width: int, hidden: int, rng, boxed: bool = False) -> dict:
  """The head's parameters for a ViT of `vit_width` and an LLM of `hidden` (`boxed`: with logical axes)."""
  params = head.init(rng, jnp.zeros((1, vit_width)), jnp.zeros((1, hidden)))["params"]
  return params if boxed else nn.meta.unbox(params)


# --- evaluation ----------------------------------------------------------------------------------------------------

def retrieval_recall(img: np.ndarray, txt: np.ndarray, captions: list[str], ks=(1, 5)) -> dict:
  """Zero-shot retrieval over N pairs: image -> text and text -> image recall@k. A hit is any item whose caption
  equals the query's partner caption (shapes captions repeat: "a red circle." names many images), so chance
  recall@k is about k x (share of items with that caption) rather than k / N; `chance@k` is that expectation."""
  sim = np.asarray(img, np.float64) @ np.asarray(txt, np.float64).T
  same = np.asarray([[a == b for b in captions] for a in captions])
  out = {}
  for k in ks:
    top_i2t = np.argsort(-sim, axis=1)[:, :k]
    top_t2i = np.argsort(-sim.T, axis=1)[:, :k]
    out[f"i2t_recall@{k}"] = float(np.mean([same[i, top_i2t[i]].any() for i in range(len(captions))]))
    out[f"t2i_recall@{k}"] = float(np.mean([same[i, top_t2i[i]].any() for i in range(len(captions))]))
    share = same.sum(axis=1) / len(captions)
    out[f"chance@{k}"] = float(np.mean(1 - (1 - share) ** k))
  return out


def zero_shot_accuracy(img: np.ndarray, class_txt: np.ndarray, labels: np.ndarray) -> float:
  """Each image's class = the class prompt whose embedding is closest; -> accuracy against `labels`."""
  pred = np.argmax(np.asarray(img) @ np.asarray(class_txt).T, axis=1)
  return float(np.mean(pred == np.asarray(labels)))
