"""Nested depths (2D Matryoshka): a transformer tower read after its first l layers, with the tower's own final
norm, pooling and projection applied there, as 2DMSE / sentence-transformers' AdaptiveLayerLoss read a model's
hidden state l through its pooling.

The one home of "the tower's output after layer l" for training, evaluation and truncation. A depth l counts the
transformer blocks run (1..depth; 2DMSE's layer 0, the embeddings alone, is not an encoder and is not offered).
Towers, by kind:
- "vit": open_clip's VisionTransformer (model.visual): _embeds, blocks, its _pool (ln_post, pooling), proj;
- "clip-text": open_clip CLIP's built-in text tower (token_embedding, transformer, ln_final, text_projection on the
  model itself): encode_text's steps;
- "text-transformer": open_clip's TextTransformer (model.text of a CustomTextCLIP);
- "hf": open_clip's HFTextEncoder: the Hugging Face model's hidden_states[l] through the tower's pooler and proj.
A timm image tower (a CNN: stages of different widths) has no such exits and is refused in one line.

`tower_exits` runs each input once through the tower and reads every exit on the way, so a grid of depths costs
what the full depth costs.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .dims import parse_int_list
from .errors import UserError

IMAGE, TEXT = "image", "text"
FLAGS = {IMAGE: "--image-layers", TEXT: "--text-layers"}


def tower_kind(model, tower: str) -> str:
    """"vit", "clip-text", "text-transformer" or "hf"; one line for a tower without layer exits."""
    from open_clip.hf_model import HFTextEncoder
    from open_clip.transformer import TextTransformer, VisionTransformer

    if tower == IMAGE:
        visual = model.visual
        if isinstance(visual, VisionTransformer):
            return "vit"
        raise UserError(f"{FLAGS[IMAGE]}: the image tower is a {type(visual).__name__} "
                        f"({getattr(visual, 'trunk', visual).__class__.__name__}), not a transformer: its stages "
                        "have different widths, so there is no layer to exit at (only open_clip "
                        "VisionTransformer image towers have layer exits)")
    text = getattr(model, "text", None)
    if isinstance(text, HFTextEncoder):
        return "hf"
    if isinstance(text, TextTransformer):
        return "text-transformer"
    if text is None and hasattr(model, "transformer") and hasattr(model, "token_embedding"):
        return "clip-text"
    raise UserError(f"{FLAGS[TEXT]}: {type(text).__name__} text towers have no layer exits (open_clip's built-in "
                    "and Hugging Face text towers do)")


def tower_depth(model, tower: str) -> int:
    """How many layers (transformer blocks) the tower runs."""
    kind = tower_kind(model, tower)
    if kind == "vit":
        return len(model.visual.transformer.resblocks)
    if kind == "clip-text":
        return len(model.transformer.resblocks)
    if kind == "text-transformer":
        return len(model.text.transformer.resblocks)
    return int(model.text.config.num_hidden_layers)


def parse_layers(text: Optional[str], flag: str) -> Optional[list[int]]:
    return None if text is None else parse_int_list(text, flag)


def check_layers(layers: Sequence[int], depth: int, flag: str, must_end_at_depth: bool = True) -> list[int]:
    """Strictly increasing depths in 1..depth; for training the last must be the tower's depth (checked like
    --dims)."""
    layers = list(layers)
    if not layers:
        raise UserError(f"{flag} is empty")
    if any(not isinstance(depth, int) or depth <= 0 for depth in layers):
        raise UserError(f"{flag} must be positive integers (layers run), got {layers}")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise UserError(f"{flag} must be strictly increasing, got {layers}")
    if layers[-1] > depth:
        raise UserError(f"{flag} {layers} go past the tower's depth {depth}")
    if must_end_at_depth and layers[-1] != depth:
        raise UserError(f"{flag} must end at the tower's depth {depth}, got {layers}")
    return layers


def _blocks(transformer, x, last: int, attn_mask=None):
    """(l, hidden state NLD after l blocks) for l = 1..last, as open_clip's Transformer.forward runs them."""
    from torch.utils.checkpoint import checkpoint

    if not transformer.batch_first:
        x = x.transpose(0, 1).contiguous()
    for i, block in enumerate(transformer.resblocks[:last]):
        if transformer.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint(block, x, None, None, attn_mask, use_reentrant=False)
        else:
            x = block(x, attn_mask=attn_mask)
        yield i + 1, (x if transformer.batch_first else x.transpose(0, 1))


def _project(pooled, projection):
    if projection is None:
        return pooled
    return projection(pooled) if isinstance(projection, torch.nn.Linear) else pooled @ projection


def _vit_exits(visual, images, layers):
    out = []
    for depth, x in _blocks(visual.transformer, visual._embeds(images), layers[-1]):
        if depth in layers:
            pooled, _ = visual._pool(x)
            out.append(_project(pooled, visual.proj))
    return out


def _clip_text_exits(model, text, layers):
    from open_clip.transformer import text_global_pool

    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype) + model.positional_embedding.to(cast_dtype)
    out = []
    for depth, h in _blocks(model.transformer, x, layers[-1], attn_mask=model.attn_mask):
        if depth in layers:
            h = model.ln_final(h)
            pooled = text_global_pool(h, text, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
            out.append(_project(pooled, model.text_projection))
    return out


def _text_transformer_exits(tower, text, layers):
    from open_clip.transformer import text_global_pool

    x, attn_mask = tower._embeds(text)
    out = []
    for depth, h in _blocks(tower.transformer, x, layers[-1], attn_mask=attn_mask):
        if depth not in layers:
            continue
        if tower.cls_emb is not None:  # CoCa's appended class token: last token, norm after pooling
            pooled = tower.ln_final(text_global_pool(h, pool_type="last"))
        else:
            pooled = text_global_pool(tower.ln_final(h), text, pool_type=tower.pool_type,
                                      eos_token_id=getattr(tower, "eos_id", None))
        out.append(_project(pooled, tower.text_projection))
    return out


def hf_pooled_exits(tower, text, layers) -> list:
    """The HF tower's pooled (not yet projected) output at each depth: hidden_states[l] through its pooler (a
    [CLS] pooler that uses the model's pooler_output runs the model's own pooler on hidden state l)."""
    from open_clip.hf_model import ClsPooler
    from transformers.modeling_outputs import BaseModelOutput

    mask = (text != tower.config.pad_token_id).long()
    hidden = tower.transformer(input_ids=text, attention_mask=mask, output_hidden_states=True).hidden_states
    own_pooler = getattr(tower.transformer, "pooler", None)
    out = []
    for depth in layers:
        if isinstance(tower.pooler, ClsPooler) and tower.pooler.use_pooler_output and own_pooler is not None:
            out.append(own_pooler(hidden[depth]))
        else:
            out.append(tower.pooler(BaseModelOutput(last_hidden_state=hidden[depth]), mask))
    return out


def tower_exits(model, tower: str, inputs, layers: Sequence[int]) -> list:
    """The tower's unnormalised features after each of `layers` (increasing), from one pass: [B, embed_dim] each.
    At the tower's depth they equal encode_image / encode_text."""
    kind = tower_kind(model, tower)
    layers = list(layers)
    if kind == "vit":
        return _vit_exits(model.visual, inputs, layers)
    if kind == "clip-text":
        return _clip_text_exits(model, inputs, layers)
    if kind == "text-transformer":
        return _text_transformer_exits(model.text, inputs, layers)
    return [model.text.proj(p) for p in hf_pooled_exits(model.text, inputs, layers)]


def normalized_exits(model, tower: str, inputs, layers: Optional[Sequence[int]]) -> torch.Tensor:
    """[exits, B, embed_dim] L2-normalised features at each depth (layers None: the full tower alone, [1, B, D])."""
    if layers is None:
        encode = model.encode_image if tower == IMAGE else model.encode_text
        return F.normalize(encode(inputs), dim=-1).unsqueeze(0)
    return F.normalize(torch.stack(tower_exits(model, tower, inputs, layers)), dim=-1)
