"""`python -m sparsesearch`: the command line where the package is importable but not installed
(a GPU machine that only has the checkout on its path)."""

from .cli import app

app(prog_name="sparsesearch")
