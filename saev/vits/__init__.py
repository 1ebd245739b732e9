"""Vision transformer backbones and the recorder that hooks their residual blocks.

```python
vit = saev.vits.make_vit("clip", "ViT-B-32/openai")          # or pretrained=False
transform = saev.vits.make_img_transform("clip", "ViT-B-32/openai")
rec = saev.vits.Recorder(vit, layers=[-2])
out, acts = rec(imgs)          # acts: [b, n_layers, n_tokens, d_vit], CLS first, registers dropped
vit = saev.vits.make_recorded_vit("timm", "vit_base_patch16_224", pretrained=False, seed=42,
                                  head=True)   # a recording's model again; vit.head: logits
with saev.vits.splice(vit, layer, fn):   # fn: stored tokens [b, n_tokens, d] -> same shape
    emb = vit(imgs)                      # the rest of the model runs on fn's output
```
"""

from saev.vits.models import (
    DINOV2_ALIASES,
    FAMILIES,
    Family,
    Vit,
    make_img_transform,
    make_recorded_vit,
    make_vit,
)
from saev.vits.recorder import Recorder, splice

__all__ = [
    "DINOV2_ALIASES",
    "FAMILIES",
    "Family",
    "Recorder",
    "Vit",
    "make_img_transform",
    "make_recorded_vit",
    "make_vit",
    "splice",
]
