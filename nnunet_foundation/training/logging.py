"""nnU-Net's local logger with room for semi-supervised terms, drawn as a fourth panel of progress.png.

Ratios that span orders of magnitude (the gradient-norm ratio of the unsupervised to the supervised term, measured
from 1e-4 to 1e-2 on Hippocampus) get their own logarithmic axis in that panel."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
from nnunetv2.training.logging.nnunet_logger import LocalLogger  # noqa: E402


class SSLLocalLogger(LocalLogger):
    """Registers extra per-epoch keys; ``progress.png`` gets nnU-Net's three panels plus one for the SSL terms
    (``ssl_keys`` on a linear axis, ``ratio_keys`` on a logarithmic one at the right)."""

    def __init__(self, ssl_keys, verbose: bool = False, ratio_keys=()):
        super().__init__(verbose)
        self.ssl_keys = tuple(ssl_keys)
        self.ratio_keys = tuple(ratio_keys)
        for k in self.ssl_keys + self.ratio_keys:
            self.my_fantastic_logging[k] = []

    def load_checkpoint(self, checkpoint: dict):
        super().load_checkpoint(checkpoint)
        # a checkpoint written before a key existed: pad with NaN so every list keeps one entry per epoch
        epochs = len(self.my_fantastic_logging.get("train_losses", []))
        for k in self.ssl_keys + self.ratio_keys:
            values = self.my_fantastic_logging.setdefault(k, [])
            values.extend([math.nan] * (epochs - len(values)))

    def plot_progress_png(self, output_folder):
        log = self.my_fantastic_logging
        epoch = min(len(v) for v in log.values()) - 1
        if epoch < 0:
            return
        x = list(range(epoch + 1))
        fig, axes = plt.subplots(4, 1, figsize=(16, 26))

        ax = axes[0]
        ax2 = ax.twinx()
        ax.plot(x, log["train_losses"][:epoch + 1], color="b", label="loss_tr (total)", linewidth=3)
        ax.plot(x, log["val_losses"][:epoch + 1], color="r", label="loss_val", linewidth=3)
        ax2.plot(x, log["mean_fg_dice"][:epoch + 1], color="g", ls="dotted", label="pseudo dice", linewidth=2)
        ax2.plot(x, log["ema_fg_dice"][:epoch + 1], color="g", label="pseudo dice (mov. avg.)", linewidth=3)
        ax.set_xlabel("epoch"); ax.set_ylabel("loss"); ax2.set_ylabel("pseudo dice")
        ax.legend(loc=(0, 1)); ax2.legend(loc=(0.3, 1))

        ax = axes[1]
        durations = [e - s for e, s in zip(log["epoch_end_timestamps"][:epoch + 1],
                                           log["epoch_start_timestamps"][:epoch + 1])]
        ax.plot(x, durations, color="b", label="epoch duration", linewidth=3)
        ax.set_ylim(bottom=0); ax.set_xlabel("epoch"); ax.set_ylabel("time [s]"); ax.legend(loc=(0, 1))

        ax = axes[2]
        ax.plot(x, log["lrs"][:epoch + 1], color="b", label="learning rate", linewidth=3)
        ax.set_xlabel("epoch"); ax.set_ylabel("learning rate"); ax.legend(loc=(0, 1))

        ax = axes[3]
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, k in enumerate(self.ssl_keys):
            ax.plot(x, log[k][:epoch + 1], color=colors[i % len(colors)], label=k, linewidth=3)
        ax.set_xlabel("epoch"); ax.set_ylabel("semi-supervised terms"); ax.legend(loc=(0, 1), ncol=4)
        if self.ratio_keys:
            ax2 = ax.twinx()
            for i, k in enumerate(self.ratio_keys):
                ax2.plot(x, log[k][:epoch + 1], color="k", ls=("--", ":", "-.")[i % 3], marker="o", label=k,
                         linewidth=2)
            # a log axis needs a positive value; zeros and NaNs (not measured) are simply not drawn
            if any(v > 0 for k in self.ratio_keys for v in log[k][:epoch + 1] if math.isfinite(v)):
                ax2.set_yscale("log")
            ax2.set_ylabel("ratio (log scale)"); ax2.legend(loc=(0.6, 1))

        fig.tight_layout()
        fig.savefig(f"{output_folder}/progress.png")
        plt.close(fig)
