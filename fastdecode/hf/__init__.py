"""The only transformers-aware code: the ``fastdecode`` attention implementation and running a
causal LM one draft tree at a time. Importing this package registers the attention."""

from fastdecode.hf.attention import register
from fastdecode.hf.cpu_linears import CpuLinears, use_cpu_linears
from fastdecode.hf.model import TreeRunner, TreeStep, check_model
from fastdecode.hf.structure import structure_model

register()

__all__ = ["CpuLinears", "TreeRunner", "TreeStep", "check_model", "register", "structure_model",
           "use_cpu_linears"]
