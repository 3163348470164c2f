"""What every tokenizer of the package shares: the ChatML / end-of-text surface forms and the error type (its own
module so that the tokenizer implementations import it rather than each other)."""

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"


class TokenizerError(ValueError):
  """Text the tokenizer cannot encode as asked (message says why)."""
