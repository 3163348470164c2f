"""Test helper: a tiny Qwen2-style tokenizer.json (byte-level BPE + special tokens) whose ids fit a fixture model.
Qwen2-VL (`build`): regular pieces 0..479, <|vision_start|> 480, <|vision_end|> 481, <|image_pad|> 482,
<|video_pad|> 483, then the ChatML and grounding tokens from 485 on (484 is the fixture's padding id). InternVL
(`build(path, INTERNVL_SPECIALS, 488)`): <img> 488, </img> 489, <IMG_CONTEXT> 490, <|endoftext|> 492,
<|im_end|> 493 (the fixture's eos), <|im_start|> 494."""

SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|pad_fixture|>",
            "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>"]
INTERNVL_SPECIALS = ["<img>", "</img>", "<IMG_CONTEXT>", "<|pad_fixture|>", "<|endoftext|>", "<|im_end|>",
                     "<|im_start|>"]
TEXTS = ["You are a helpful assistant.", "What is in the picture?", "a red square and a blue circle",
         "the cat sits on the mat", "user", "assistant", "system", "(12,34),(56,78)"] * 20


def build(path: str, specials=tuple(SPECIALS), regular: int = 480) -> str:
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=regular, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(TEXTS, trainer)
  filler = [f"<|unused_{i}|>" for i in range(regular - tok.get_vocab_size())]  # the corpus may give fewer merges
  tok.add_tokens(filler)
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
  assert tok.token_to_id(specials[0]) == regular
  tok.save(path)
  return path


# Qwen2 / Qwen2-VL's added tokens, in id order from 151643 (the ids Qwen2-VL's config.json names: vision_start
# 151652, image_pad 151655, video_pad 151656)
QWEN2_VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                     "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                     "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def build_from_tiktoken(path: str) -> str:
  """A Qwen2-VL-style tokenizer.json from Qwen's `qwen.tiktoken` (the `dashscope` wheel ships it; Qwen2 kept the
  same 151,643 byte-level BPE ranks): transformers' TikTokenConverter with Qwen's pre-tokenisation pattern (single
  digits), NFC normalisation as Qwen2's file has, and the Qwen2-VL special tokens."""
  from tokenizers import normalizers
  from transformers.convert_slow_tokenizer import TikTokenConverter

  from qwenvl_jax.data.tokenizer import QWEN_PATTERN, default_qwen_vocab
  tok = TikTokenConverter(vocab_file=default_qwen_vocab(), pattern=QWEN_PATTERN,
                          extra_special_tokens=QWEN2_VL_SPECIALS).converted()
  tok.normalizer = normalizers.NFC()
  assert tok.token_to_id("<|endoftext|>") == 151643 and tok.token_to_id("<|image_pad|>") == 151655
  tok.save(path)
  return path
