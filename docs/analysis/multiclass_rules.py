"""Diagnostic (not a selection: it reads the test split): the merged foreground, per-image class
mean and lesion-type accuracy (at 128²) of a `channels` model under other label rules than METHOD
§7's (the best class's own probability > 0.5): the sum of the class probabilities > 0.5, and the
best class's probability > 0.25.

python docs/analysis/multiclass_rules.py   (paths below: the record's runs)
"""

import numpy as np

from gms_jax import checkpoint, metrics
from gms_jax.data import builder, pipeline
from gms_jax.predict import Segmenter

seg = Segmenter.from_workdir("runs/busi3_channels")
cfg = checkpoint.load_config("runs/busi3_channels").data
with cfg.unlocked():
  cfg.tfds_dir = ""  # the default cache
src = builder.prepare(cfg)["test"]
ex = list(pipeline.eval_examples(src, image_size=128))
p = seg.predict_probs(np.stack([e["image"] for e in ex]))
gt = np.stack([np.rint(e["mask"]).astype(np.uint8) for e in ex])
cur = seg.classes.labels(p)
alt = np.where(p.sum(-1) > 0.5, np.argmax(p, -1) + 1, 0)
alt2 = np.where(p.max(-1) > 0.25, np.argmax(p, -1) + 1, 0)
for name, lab in (("current", cur), ("sum>0.5", alt), ("max>0.25", alt2)):
  fd, _ = metrics.dice_iou(lab > 0, gt > 0)
  d, _ = metrics.class_dice_iou(lab, gt, 3)
  typ = [metrics.lesion_type(l, 3) for l in lab]
  tt = [metrics.lesion_type(g, 3) for g in gt]
  print(
    name,
    "merged",
    round(fd.mean(), 4),
    "per-image mean",
    round(float(np.mean(np.nan_to_num(metrics.nanmean(d, axis=-1)))), 4),
    "type acc",
    round(np.mean(np.array(typ) == np.array(tt)), 4),
  )
