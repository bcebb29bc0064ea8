"""ChatGLM2 model library: config, tokenizer, model, P-Tuning v2 prefixes, quantization, checkpoint IO."""
from .checkpoint import CheckpointError, load_model, load_prefix, load_prefix_encoder, save_model, save_prefix
from .config import ChatGLMConfig
from .model import ChatGLM
from .prefix import PrefixEncoder, PrefixKV
