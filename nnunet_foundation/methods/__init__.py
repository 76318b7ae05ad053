"""One file per method, each a small subclass of the shared semi-supervised trainer."""
