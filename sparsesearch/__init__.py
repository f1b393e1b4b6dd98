"""sparsesearch: hardware-aware AutoML for structured sparsity in conv nets (StructADMM)."""

__version__ = "0.1.0"
