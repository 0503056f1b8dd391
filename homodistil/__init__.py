"""homodistil: homotopic distillation of pre-trained transformers on DeepSpeed."""

__version__ = "0.1.0"
