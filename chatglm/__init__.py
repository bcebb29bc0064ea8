"""ChatGLM2 model library: config, tokenizer, model, P-Tuning v2 prefixes, quantization, checkpoint IO."""
from .chat import chat, stream_chat
from .checkpoint import CheckpointError, load_model, load_prefix, load_prefix_encoder, save_model, save_prefix
from .config import ChatGLMConfig
from .model import ChatGLM
from .prefix import PrefixEncoder, PrefixKV
from .tokenizer import ChatGLMTokenizer, build_chat_prompt


def load_tokenizer(path: str) -> ChatGLMTokenizer:
    """The tokenizer of a ChatGLM2 folder (its tokenizer.model)."""
    return ChatGLMTokenizer.from_folder(path)
