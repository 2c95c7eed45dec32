"""Graph rewrites of slimfit_fx (installed as ``slimfit_fx.passes``).

One pass per module; each is a function ``GraphModule -> GraphModule`` whose
docstring states what it matches and what it emits.
"""
