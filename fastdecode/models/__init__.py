"""Real models to decode with, loaded offline: :func:`load_default` gives SmolLM2-135M-Instruct
and its tokenizer; :func:`default_model_dir` is where its converted copy is cached."""

from fastdecode.models.default import default_model_dir, load_default

__all__ = ["default_model_dir", "load_default"]
