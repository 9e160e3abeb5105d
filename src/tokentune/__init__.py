"""tokentune: fine-tune language models on the parameters, samples and tokens that matter."""

__version__ = "0.1.0"
