"""IFL (iterative foundation-dedicated learning): key slices from the rounds' predictions (keyframes.py) and their
propagation by a box-prompted generalist (propagation.py). The round loop (nnunet-foundation ifl) is not built yet."""
