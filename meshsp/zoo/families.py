"""The nine families with shipped plans (their tiny configs live in ``meshsp.tiny``)."""

from meshsp.tiny import FAMILIES, make_inputs
from meshsp.zoo import Tiny

_VIDEO = {"wan", "ltx", "hunyuan-video", "cogvideox"}
_MASKED = {"qwen-image", "ltx", "hunyuan-video"}


def _entry(family: str) -> Tiny:
    fam = FAMILIES[family]

    def inputs(model, *, h, w, frames, txt, batch, text_pad, rand):
        del rand  # meshsp.tiny seeds its own generator
        return make_inputs(family, model, h=h, w=w, frames=frames, txt=txt, batch=batch, text_pad=text_pad)

    def heads(n):
        return {fam.heads_key: n, **{k: n * 16 for k in fam.width_keys}}

    return Tiny(fam.cls, dict(fam.config), inputs, heads, video=family in _VIDEO, text_mask=family in _MASKED)


ENTRIES = [_entry(f) for f in FAMILIES]
