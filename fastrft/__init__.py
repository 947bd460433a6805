"""fastrft: a lean GRPO trainer for vision-language models on packed, shared-prompt batches."""

__version__ = "0.1.0"
