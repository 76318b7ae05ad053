"""IFL (iterative foundation-dedicated learning): key slices from the rounds' predictions (keyframes.py), their
propagation by a box-prompted generalist (propagation.py), the per-round pseudo-labels (rounds.py) and the round
trainers (trainer.py); ``nnunet-foundation ifl`` (cli/ifl.py) runs the rounds."""
