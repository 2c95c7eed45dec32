"""Runtime ops called by rewritten graphs."""
