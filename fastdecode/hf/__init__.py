"""The transformers layer: the ``fastdecode`` attention implementation, running a causal LM one
draft tree at a time (with its measured step costs), structured FFNs and CPU linears for
transformers models. Importing this package registers the attention. ``fastdecode.ops`` and
``fastdecode.nn`` never import transformers; besides this package, ``fastdecode.decoding``
(``generate``) and ``fastdecode.models`` (``load_default``) do."""

from fastdecode.hf.attention import register
from fastdecode.hf.cpu_linears import CpuLinears, use_cpu_linears
from fastdecode.hf.model import TreeRunner, TreeStep, check_model
from fastdecode.hf.structure import structure_model

register()

__all__ = ["CpuLinears", "TreeRunner", "TreeStep", "check_model", "register", "structure_model",
           "use_cpu_linears"]
