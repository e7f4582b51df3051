"""``vitdecomp reproduce <experiment>``: the published experiments, one command each, on the datasets'
own layouts (README “Reproduce the published experiments”).

One module per experiment — :mod:`.waterbirds` (spurious-feature mitigation, worst-group accuracy),
:mod:`.imagenet_ablation` (zero-shot accuracy under mean ablation), :mod:`.segmentation` (token
heatmaps against binary masks: pixAcc, mIoU, mAP). Each validates the dataset layout before any work,
then chains the library's decompose → fit → query jobs with the published settings and returns a table
with the published number next to the measured one. Configs are in :mod:`.config` (imports nothing
heavy); shared helpers in :mod:`.common`.
"""
EXPERIMENTS = ("waterbirds", "imagenet-ablation", "segmentation")

__all__ = ["EXPERIMENTS"]
