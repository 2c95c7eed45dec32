"""Runtime ops called by rewritten graphs: ``torch.autograd.Function``s whose forwards are eager's.

Each takes what the op it replaces takes (plus formats as tuples, ``saved.fmt_to_args``) and gives
that op's result bit for bit; only what it keeps for backward differs, as the op table prices it.
They read the freeze gate (``requires_grad``) when they run.  Never keep a tensor outside
``saved.save`` (saved-tensor hooks must see every byte), never draw from the global RNG beyond
what eager draws.
"""
