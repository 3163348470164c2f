"""What every tokenizer of the package shares: the ChatML / end-of-text surface forms and the error type (its own
module so that the tokenizer implementations import it rather than each other)."""

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# The official pre-tokenisation pattern of Qwen's BPE (tiktoken's, and the Qwen2-style tokenizer.json's).
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
                r"""\s+(?!\S)|\s+""")


class TokenizerError(ValueError):
  """Text the tokenizer cannot encode as asked (message says why)."""


def check_unicode(text: str) -> None:
  """A lone surrogate (from JSON "\\ud800" or a terminal) is no text: TokenizerError, not a crash in the encoder."""
  if not text.isascii():
    try:
      text.encode("utf-8")
    except UnicodeEncodeError as e:
      raise TokenizerError(f"text is not valid Unicode: a lone surrogate at character {e.start}") from None
