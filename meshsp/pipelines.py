"""Tiny random-weight diffusers pipelines, built offline and loaded through ``from_pretrained``.

Each pipeline in :data:`TINY_PIPELINES` is a real diffusers pipeline class (``QwenImagePipeline``,
``FluxPipeline``, ``WanPipeline``) whose components all follow the real architecture at toy width:
a transformer, a VAE with the real spatial (8x) and temporal (4x) compression, small random-init
text encoders from ``transformers`` and tokenizers built from scratch with the ``tokenizers``
library (byte-level BPE for Qwen2 and CLIP, Unigram for T5/UMT5), so nothing is downloaded.

:func:`tiny_pipeline_path` builds a pipeline once (seeded, so the weights are deterministic),
writes it with ``save_pretrained`` into a cache directory and returns that directory;
:func:`load_tiny_pipeline` then loads it with the real ``DiffusionPipeline.from_pretrained`` code
path. Building is safe under concurrency (several ranks on one host): one process builds under an
``fcntl.flock`` lock into a temporary sibling directory that is renamed into place only when it is
complete, so no process ever sees a half-written pipeline. The directory name carries a hash of
the build specification (configs, tokenizer word list, library versions), so changing any config
rebuilds instead of reusing a stale cache.

Example::

    pipe = load_tiny_pipeline("tiny-qwen-image")
    image = pipe(**example_call_kwargs("tiny-qwen-image")).images[0]   # 64x64 PIL image
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BUILD_VERSION",
    "TINY_PIPELINES",
    "build_tiny_pipeline",
    "example_call_kwargs",
    "load_tiny_pipeline",
    "tiny_pipeline_path",
]

#: Bump when the build code changes in a way the spec hash does not capture.
BUILD_VERSION = "1"

#: Name -> description of every tiny pipeline this module can build.
TINY_PIPELINES: dict[str, str] = {
    "tiny-qwen-image": (
        "QwenImagePipeline: QwenImageTransformer2DModel (2 layers, 2x16 heads), tiny "
        "Qwen2_5_VLForConditionalGeneration text encoder (hidden 16, 2 layers), byte-level BPE "
        "Qwen2Tokenizer, AutoencoderKLQwenImage (z_dim 4, 8x spatial), FlowMatchEulerDiscreteScheduler."
    ),
    "tiny-flux": (
        "FluxPipeline (FLUX.1-dev style, guidance-distilled): FluxTransformer2DModel (1+1 layers, 2x16 "
        "heads), CLIPTextModel (hidden 32) + T5EncoderModel (d_model 32), byte-level BPE CLIPTokenizer "
        "and Unigram T5Tokenizer, AutoencoderKL (4 latent channels, 8x), FlowMatchEulerDiscreteScheduler."
    ),
    "tiny-wan": (
        "WanPipeline (Wan2.1 text-to-video): WanTransformer3DModel (2 layers, 2x16 heads), "
        "UMT5EncoderModel (d_model 16), Unigram T5Tokenizer, AutoencoderKLWan (z_dim 4, 8x spatial, "
        "4x temporal), FlowMatchEulerDiscreteScheduler(shift=3.0)."
    ),
}

# --------------------------------------------------------------------------------------------------
# Build specification. Everything that determines the saved weights or files lives in these dicts
# (plus the word list), so their hash names the cache directory.
# --------------------------------------------------------------------------------------------------

#: Words every tokenizer encodes as single tokens (others fall back to characters / bytes).
_WORDS: tuple[str, ...] = tuple(
    """a an the of on in at to with and or is are by for from into over under near
    cat cats dog dogs bird fish horse cow fox bear lion tiger monkey rabbit mouse person man woman
    child girl boy face hand eye tree trees flower flowers grass forest mountain mountains river lake
    sea ocean beach sky cloud clouds sun moon star stars city street house road car boat train
    window door table chair cup book red orange yellow green blue purple pink white black gray
    brown gold silver bright dark light small large big tiny cute old new happy beautiful sitting
    standing running walking flying swimming photo photograph picture painting drawing sketch
    portrait landscape style art detailed realistic high quality low bad blurry best masterpiece
    dance night day morning evening winter summer spring autumn snow rain fire water wood stone
    text sign circle circles square squares triangle triangles shape shapes background""".split()
)

#: Trained weights shipped for a tiny pipeline (``scripts/build_tiny_weights.py`` reproduces them):
#: ``<name>.safetensors`` holding ``transformer.*`` and ``vae.*`` tensors, loaded over the seeded ones,
#: and in its metadata the fitted VAE's latent statistics (``vae_config``).
_ASSETS = Path(__file__).resolve().parent / "assets"

# QwenImagePipeline encodes prompts as this chat template and drops the first
# ``prompt_template_encode_start_idx`` (34) tokens; the tiny Qwen2 tokenizer learns its words so the
# template prefix is exactly 34 tokens, as with the real Qwen2.5-VL tokenizer.
_QWEN_PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
    "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
    "{}<|im_end|>\n<|im_start|>assistant\n"
)
_QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
)

_SPECS: dict[str, dict[str, Any]] = {
    "tiny-qwen-image": {
        "transformer": dict(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=[8, 4, 4]),
        "vae": dict(
            base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
            latents_mean=[0.0] * 4, latents_std=[1.0] * 4),
        "text_config": dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]}),
        "vision_config": dict(
            depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
            fullatt_block_indexes=[0]),
        "scheduler": dict(  # the real Qwen-Image scheduler config
            base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
            shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True),
        "tokenizer": dict(model_max_length=2048),
    },
    "tiny-flux": {
        "transformer": dict(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=[4, 4, 8]),
        "vae": dict(
            in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 8, 8], layers_per_block=1,
            latent_channels=4, norm_num_groups=4, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
            use_quant_conv=False, use_post_quant_conv=False),
        "clip": dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu"),
        "t5": dict(
            d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, relative_attention_num_buckets=8,
            relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0),
        "scheduler": dict(  # the real FLUX.1-dev scheduler config
            base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
            use_dynamic_shifting=True),
        "tokenizer": dict(clip_max_length=77, t5_max_length=512),
    },
    "tiny-wan": {
        "transformer": dict(
            patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
        "vae": dict(
            base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
            latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_temporal=4, scale_factor_spatial=8),
        "umt5": dict(
            d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, relative_attention_num_buckets=8,
            relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0),
        "scheduler": dict(shift=3.0),  # Wan2.1 480p flow shift
        "tokenizer": dict(t5_max_length=512),
    },
}

#: Call arguments that run one quick, deterministic generation with each pipeline (seeded by
#: :func:`example_call_kwargs`); guidance is on in every one of them.
_EXAMPLE_CALLS: dict[str, dict[str, Any]] = {
    "tiny-qwen-image": dict(
        prompt="a cat", negative_prompt="blurry", true_cfg_scale=4.0, height=64, width=64, num_inference_steps=2),
    "tiny-flux": dict(prompt="a cat", guidance_scale=3.5, height=64, width=64, num_inference_steps=2,
                      max_sequence_length=64),
    "tiny-wan": dict(prompt="a cat", negative_prompt="blurry", guidance_scale=5.0, height=64, width=64,
                     num_frames=5, num_inference_steps=2, max_sequence_length=64),
}


def _check_name(name: str) -> None:
    if name not in TINY_PIPELINES:
        raise ValueError(f"unknown tiny pipeline {name!r}; known: {sorted(TINY_PIPELINES)}.")


# --------------------------------------------------------------------------------------------------
# Tokenizers, built from scratch (no hub access).
# --------------------------------------------------------------------------------------------------


def _learn_bpe(
    corpus: list[str], normalizer: Any, pre_tokenizer: Any, end_of_word_suffix: str = ""
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn byte-level BPE merges until every pre-tokenized corpus word is a single token.

    A small deterministic trainer (most frequent pair first, ties broken by the pair itself):
    ``tokenizers``' ``BpeTrainer`` breaks ties in hash order once ``end_of_word_suffix`` is set, so
    its vocabulary would change from one process to the next. The vocabulary starts from the
    256-symbol byte-level alphabet (each also with ``end_of_word_suffix`` when one is given), so any
    text still encodes. Returns ``(vocab, merges)`` as the transformers tokenizer classes take them.
    """
    from collections import Counter

    from tokenizers import pre_tokenizers

    words: Counter[tuple[str, ...]] = Counter()
    for text in corpus:
        for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            symbols = list(piece)
            symbols[-1] += end_of_word_suffix
            words[tuple(symbols)] += 1

    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + ([a + end_of_word_suffix for a in alphabet] if end_of_word_suffix else [])
    tokens += [a + b for a, b in merges]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def _qwen2_tokenizer(model_max_length: int):
    """A ``Qwen2Tokenizer`` (byte-level BPE with Qwen2's pre-tokenizer and chat special tokens)."""
    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    words = " ".join(_WORDS)
    corpus = [_QWEN_PROMPT_TEMPLATE.format(words), words, " ".join(w.capitalize() for w in _WORDS)]
    # Specials are taken out of the corpus so BPE does not learn merges across them.
    for special in _QWEN_SPECIAL_TOKENS:
        corpus = [text.replace(special, "\n") for text in corpus]
    vocab, merges = _learn_bpe(corpus, normalizers.NFC(), pre)
    for special in _QWEN_SPECIAL_TOKENS:
        vocab[special] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", additional_special_tokens=list(_QWEN_SPECIAL_TOKENS[1:]),
        model_max_length=model_max_length)


def _clip_tokenizer(model_max_length: int):
    """A ``CLIPTokenizer`` (lower-cased byte-level BPE with ``</w>`` word ends)."""
    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers import CLIPTokenizer

    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(
            Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    vocab, merges = _learn_bpe([" ".join(_WORDS)], normalizer, pre, end_of_word_suffix="</w>")
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _t5_tokenizer(model_max_length: int):
    """A ``T5Tokenizer`` (SentencePiece-style Unigram): pad 0, eos 1, unk 2, words, then characters."""
    import string

    from transformers import T5Tokenizer

    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + word, -5.0) for word in _WORDS]
    vocab += [(ch, -10.0) for ch in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


# --------------------------------------------------------------------------------------------------
# Pipelines.
# --------------------------------------------------------------------------------------------------


def _seeded(factory: Callable[[], Any]) -> Any:
    """Build one component right after ``torch.manual_seed(0)`` (each component's weights are then
    independent of the others')."""
    torch.manual_seed(0)
    return factory()


def _build_qwen_image(spec: dict[str, Any]):
    from diffusers import (
        AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = _qwen2_tokenizer(**spec["tokenizer"])
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in _QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            spec["text_config"], vocab_size=len(tokenizer), bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(spec["vision_config"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return QwenImagePipeline(
        transformer=_seeded(lambda: QwenImageTransformer2DModel(**spec["transformer"])),
        vae=_seeded(lambda: AutoencoderKLQwenImage(**spec["vae"])),
        text_encoder=_seeded(lambda: Qwen2_5_VLForConditionalGeneration(config)),
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(**spec["scheduler"]),
    )


def _t5_style_config(config_cls, fields: dict[str, Any], tokenizer):
    """A T5 / UMT5 encoder config whose vocabulary and special ids are the tokenizer's."""
    return config_cls(**fields, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)


def _build_flux(spec: dict[str, Any]):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = _clip_tokenizer(spec["tokenizer"]["clip_max_length"])
    tokenizer_2 = _t5_tokenizer(spec["tokenizer"]["t5_max_length"])
    clip_config = CLIPTextConfig(
        **spec["clip"], vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    t5_config = _t5_style_config(T5Config, spec["t5"], tokenizer_2)
    return FluxPipeline(
        transformer=_seeded(lambda: FluxTransformer2DModel(**spec["transformer"])),
        vae=_seeded(lambda: AutoencoderKL(**spec["vae"])),
        text_encoder=_seeded(lambda: CLIPTextModel(clip_config)),
        tokenizer=tokenizer,
        text_encoder_2=_seeded(lambda: T5EncoderModel(t5_config)),
        tokenizer_2=tokenizer_2,
        scheduler=FlowMatchEulerDiscreteScheduler(**spec["scheduler"]),
    )


def _build_wan(spec: dict[str, Any]):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _t5_tokenizer(spec["tokenizer"]["t5_max_length"])
    umt5_config = _t5_style_config(UMT5Config, spec["umt5"], tokenizer)
    return WanPipeline(
        transformer=_seeded(lambda: WanTransformer3DModel(**spec["transformer"])),
        vae=_seeded(lambda: AutoencoderKLWan(**spec["vae"])),
        text_encoder=_seeded(lambda: UMT5EncoderModel(umt5_config)),
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(**spec["scheduler"]),
    )


_BUILDERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "tiny-qwen-image": _build_qwen_image,
    "tiny-flux": _build_flux,
    "tiny-wan": _build_wan,
}


def _asset(name: str) -> Path | None:
    path = _ASSETS / f"{name}.safetensors"
    return path if path.is_file() else None


def _load_trained(pipe, path: Path) -> None:
    """The shipped weights over the seeded ones: every ``component.key`` tensor, strictly."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(path)
    for component in sorted({key.split(".", 1)[0] for key in tensors}):
        state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(component + ".")}
        getattr(pipe, component).load_state_dict(state, strict=True)
    with safe_open(path, "pt") as f:
        vae_config = (f.metadata() or {}).get("vae_config")
    if vae_config:  # the fitted VAE's latent statistics, which the pipeline normalises latents with
        pipe.vae.register_to_config(**json.loads(vae_config))


def build_tiny_pipeline(name: str, *, trained: bool = True):
    """Build tiny pipeline ``name`` in memory (float32, eval mode): deterministic random weights, and
    over them the trained transformer and VAE weights the package ships for it, if any (``trained``;
    ``scripts/build_tiny_weights.py`` makes them).

    The caller's global torch RNG state is left untouched. Most users want
    :func:`load_tiny_pipeline`, which goes through ``save_pretrained``/``from_pretrained``.
    """
    _check_name(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe = _BUILDERS[name](_SPECS[name])
    if trained and _asset(name) is not None:
        _load_trained(pipe, _asset(name))
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


# --------------------------------------------------------------------------------------------------
# Cache.
# --------------------------------------------------------------------------------------------------


def _default_cache_dir() -> Path:
    return Path(os.environ.get("MESHSP_CACHE") or Path.home() / ".cache" / "meshsp")


def _spec_hash(name: str) -> str:
    """Short hash of everything that determines pipeline ``name``'s saved files."""
    import diffusers
    import tokenizers
    import transformers

    payload = dict(
        build_version=BUILD_VERSION, name=name, spec=_SPECS[name], words=_WORDS,
        template=_QWEN_PROMPT_TEMPLATE, specials=_QWEN_SPECIAL_TOKENS,
        trained=hashlib.sha256(_asset(name).read_bytes()).hexdigest() if _asset(name) else None,
        versions=[torch.__version__.split("+")[0], diffusers.__version__, transformers.__version__,
                  tokenizers.__version__])
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def _is_complete(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def tiny_pipeline_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of tiny pipeline ``name`` saved with ``save_pretrained``, building it if needed.

    The directory is ``<cache_dir>/<name>-v<BUILD_VERSION>-<spec hash>``; ``cache_dir`` defaults to
    ``$MESHSP_CACHE`` or ``~/.cache/meshsp``. Safe to call from several processes at once: one
    builds under an exclusive ``flock`` into a temporary sibling directory and renames it into
    place atomically; the others wait on the lock and then reuse the result.

    Raises:
        ValueError: ``name`` is not in :data:`TINY_PIPELINES`.
    """
    _check_name(name)
    root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    root = root.expanduser()
    target = root / f"{name}-v{BUILD_VERSION}-{_spec_hash(name)}"
    if _is_complete(target):
        return target

    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        # transformers' save_pretrained writes weights only on rank 0 of an initialised group.
        raise ValueError(
            f"tiny pipeline {name!r} is not built yet and this is rank {dist.get_rank()}; call "
            "tiny_pipeline_path before initialising the process group (meshsp.Engine does)."
        )
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{target.name}.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if _is_complete(target):  # another process built it while we waited
                return target
            if target.exists():  # not made by us (our renames are atomic): clear the way
                shutil.rmtree(target)
            tmp = root / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()  # (not mkdtemp: keep the umask's permissions, the cache may be shared)
            try:
                build_tiny_pipeline(name).save_pretrained(tmp, safe_serialization=True)
                os.rename(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return target


def load_tiny_pipeline(
    name: str, cache_dir: str | os.PathLike | None = None, torch_dtype: torch.dtype = torch.float32
):
    """Load tiny pipeline ``name`` with ``DiffusionPipeline.from_pretrained`` (building it on first use).

    ``torch_dtype`` is forwarded as diffusers' ``dtype`` argument (``torch_dtype`` is deprecated there).
    """
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(tiny_pipeline_path(name, cache_dir), dtype=torch_dtype)


def example_call_kwargs(name: str, seed: int = 0) -> dict[str, Any]:
    """Keyword arguments for one quick 2-step, 64x64 generation with guidance (Wan: 5 frames).

    Includes a fresh CPU ``torch.Generator`` seeded with ``seed``; add ``output_type`` as needed.
    """
    _check_name(name)
    return dict(_EXAMPLE_CALLS[name], generator=torch.Generator().manual_seed(seed))
