"""An open_clip export as a Hugging Face `transformers.CLIPModel` folder: config, safetensors weights, tokenizer
and image processor, loadable with `CLIPModel.from_pretrained(DIR)` / `pipeline(..., model=DIR)`, no mrl_clip.

    python -m mrl_clip export --to transformers --model local-dir:RUN/export --out DIR
    (or python -m mrl_clip.export ..., the same main)

What is carried exactly (docs/export.md): open_clip's built-in CLIP towers (a VisionTransformer with a class
token, ln_pre, ln_post on that token; CLIP's own text transformer, causal mask, ln_final, argmax-of-token-id
pooling) map one tensor to one tensor (the attention's packed in-projection split into q, k, v), with GELU or
QuickGELU (`quick_gelu`), LayerNorm eps 1e-5, `logit_scale`, the context length and image size. The text config's
`eos_token_id` is 2, the value that makes transformers pool at `input_ids.argmax(-1)` (modeling_clip.py keeps it
for the original OpenAI exports): open_clip's `text.argmax(dim=-1)`, for any ids. Anything open_clip's config turns
on that CLIPModel has no module for (layer scale, attentional pooling, no ln_pre, pooling other than the class
token / argmax, projection biases, custom attention blocks, a SigLIP logit_bias, timm or Hugging Face towers) is
refused in one line, so an export never differs from its source.

Tokenizer: a CLIPTokenizer built from open_clip's own BPE (SimpleTokenizer's encoder and merge ranks), pad "!"
(id 0, open_clip's pad), model_max_length = the context length. Image processor: CLIPImageProcessorPil (PIL's
bicubic resize of the shortest side, centre crop, the export's mean/std), what open_clip's preprocess does.
The nesting record (`matryoshka_dimensions`, `matryoshka_layers`) of the source goes into config.json.
"""
import dataclasses
import json
from pathlib import Path

from .errors import ArgumentParser, UserError

TARGETS = ("transformers",)
SOT, EOT = "<|startoftext|>", "<|endoftext|>"  # open_clip's <start_of_text>, <end_of_text> under HF's CLIP names
LEGACY_ARGMAX_EOS = 2  # transformers' CLIPTextModel pools at input_ids.argmax(-1) for exactly this eos_token_id
# config fields CLIPModel represents (read by hf_config); every other field must keep open_clip's default
VISION_MAPPED = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size"}
# (a tokenizer other than open_clip's BPE, hf_tokenizer_name / tokenizer_mode / tokenizer_kwargs, is refused too:
# the export's tokenizer is built from that BPE)
TEXT_MAPPED = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
TOP_MAPPED = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "cast_dtype"}


def parse_args(argv):
    p = ArgumentParser(prog="python -m mrl_clip export", description=__doc__.split("\n\n")[0])
    p.add_argument("--to", required=True, choices=TARGETS, help="the format written")
    p.add_argument("--model", required=True, help="the export to convert, local-dir:PATH (a training run's export/)")
    p.add_argument("--out", required=True, help="the new folder (must not exist, or be empty)")
    return p.parse_args(argv)


def not_exact(what: str) -> UserError:
    return UserError(f"--to transformers: {what}; transformers' CLIPModel has no exact equivalent, so no export "
                     "is written (the open_clip local-dir: export is the portable form of this model)")


def check_representable(model_cfg: dict):
    """One line naming the first thing in `model_cfg` that CLIPModel cannot compute exactly."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    if vision.get("timm_model_name") or text.get("hf_model_name"):
        raise not_exact("an ALIGN-style model (a timm image tower and/or a Hugging Face text tower with its own "
                        "pooling) is not a CLIP ViT + CLIP text transformer")
    if "multimodal_cfg" in model_cfg:
        raise not_exact("a CoCa model has a text decoder")
    for key in sorted(set(model_cfg) - TOP_MAPPED):
        if model_cfg[key] not in (None, False):
            raise not_exact(f"model_cfg {key}={model_cfg[key]!r}")
    for name, cfg, cls, mapped in (("vision_cfg", vision, CLIPVisionCfg, VISION_MAPPED),
                                   ("text_cfg", text, CLIPTextCfg, TEXT_MAPPED)):
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for key in sorted(cfg):
            if key not in defaults:
                raise not_exact(f"{name} {key} (a field open_clip {cls.__name__} does not know)")
            if key not in mapped and cfg[key] != defaults[key] and not (key == "eos_id" and cfg.get(
                    "pool_type", "argmax") == "argmax"):
                raise not_exact(f"{name} {key}={cfg[key]!r} (open_clip's default is {defaults[key]!r})")
    size = vision.get("image_size", 224)
    if not isinstance(size, int) and len(set(size)) != 1:
        raise not_exact(f"image_size {size} is not square")


def hf_config(model_cfg: dict, logit_scale: float):
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    from transformers import CLIPConfig

    vision = CLIPVisionCfg(**model_cfg["vision_cfg"])
    text = CLIPTextCfg(**model_cfg["text_cfg"])
    size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"  # open_clip: QuickGELU, else nn.GELU (erf)
    eps = 1e-5  # open_clip's LayerNorm and LayerNormFp32 are torch's default
    return CLIPConfig(
        projection_dim=model_cfg["embed_dim"], logit_scale_init_value=logit_scale,
        vision_config=dict(hidden_size=vision.width, intermediate_size=int(vision.width * vision.mlp_ratio),
                           num_hidden_layers=vision.layers, num_attention_heads=vision.width // vision.head_width,
                           image_size=size, patch_size=vision.patch_size, hidden_act=act, layer_norm_eps=eps,
                           projection_dim=model_cfg["embed_dim"], num_channels=3),
        text_config=dict(vocab_size=text.vocab_size, hidden_size=text.width,
                         intermediate_size=int(text.width * text.mlp_ratio), num_hidden_layers=text.layers,
                         num_attention_heads=text.heads, max_position_embeddings=text.context_length,
                         hidden_act=act, layer_norm_eps=eps, projection_dim=model_cfg["embed_dim"],
                         bos_token_id=49406, eos_token_id=LEGACY_ARGMAX_EOS, pad_token_id=0))


def block_tensors(source: dict, src: str, dst: str) -> dict:
    """One residual block: open_clip's ln_1/attn/ln_2/mlp as CLIPEncoderLayer's, the packed q,k,v split."""
    out = {}
    for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                 ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
        for p in ("weight", "bias"):
            out[f"{dst}.{b}.{p}"] = source[f"{src}.{a}.{p}"]
    for p in ("weight", "bias"):
        for name, part in zip(("q_proj", "k_proj", "v_proj"), source[f"{src}.attn.in_proj_{p}"].chunk(3, dim=0)):
            out[f"{dst}.self_attn.{name}.{p}"] = part
    return out


def hf_state(source: dict, vision_layers: int, text_layers: int) -> dict:
    """open_clip CLIP's state dict under CLIPModel's names (convert_clip_original_pytorch_to_hf.py's mapping)."""
    out = {"logit_scale": source["logit_scale"],
           "visual_projection.weight": source["visual.proj"].T,
           "text_projection.weight": source["text_projection"].T,
           "vision_model.embeddings.class_embedding": source["visual.class_embedding"],
           "vision_model.embeddings.position_embedding.weight": source["visual.positional_embedding"],
           "vision_model.embeddings.patch_embedding.weight": source["visual.conv1.weight"],
           "text_model.embeddings.token_embedding.weight": source["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": source["positional_embedding"]}
    for a, b in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                 ("ln_final", "text_model.final_layer_norm")):
        for p in ("weight", "bias"):
            out[f"{b}.{p}"] = source[f"{a}.{p}"]
    for i in range(vision_layers):
        out.update(block_tensors(source, f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}"))
    for i in range(text_layers):
        out.update(block_tensors(source, f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}"))
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def hf_tokenizer(context_length: int):
    """HF's CLIPTokenizer over open_clip's own BPE vocabulary and merges (the same ids for the same tokens)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer(context_length=context_length)
    names = {"<start_of_text>": SOT, "<end_of_text>": EOT}
    vocab = {names.get(token, token): i for token, i in bpe.encoder.items()}
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges, bos_token=SOT, eos_token=EOT, unk_token=EOT,
                         pad_token=EOT, model_max_length=context_length)


def hf_image_processor(preprocess_cfg: dict, image_size: int):
    """open_clip's eval transform (resize_mode 'shortest': Resize(size, bicubic) then CenterCrop) as CLIP's PIL
    image processor; other resize modes and interpolations are refused."""
    from open_clip.transform import PreprocessCfg
    from transformers import CLIPImageProcessorPil
    from transformers.image_utils import PILImageResampling

    cfg = PreprocessCfg(**{k: v for k, v in preprocess_cfg.items() if k in
                           {f.name for f in dataclasses.fields(PreprocessCfg)}})
    resample = {"bicubic": PILImageResampling.BICUBIC, "bilinear": PILImageResampling.BILINEAR}
    if cfg.resize_mode != "shortest" or cfg.interpolation not in resample:
        raise not_exact(f"preprocess resize_mode {cfg.resize_mode!r} / interpolation {cfg.interpolation!r} "
                        "(CLIPImageProcessor resizes the shortest side, bicubic or bilinear)")
    return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                 crop_size={"height": image_size, "width": image_size},
                                 resample=resample[cfg.interpolation], image_mean=list(cfg.mean),
                                 image_std=list(cfg.std), do_convert_rgb=True)


def export_transformers(name: str, out: Path) -> dict:
    """Write `name` (local-dir:PATH, an open_clip CLIP) as a CLIPModel folder at `out`; returns its config."""
    import open_clip
    from open_clip.constants import HF_CONFIG_NAME
    from transformers import CLIPModel, CLIPProcessor

    from . import models
    from .checkpoint import read_nesting
    from .files import atomic_folder
    from .truncate import check_out, source_folder

    folder = source_folder(name)
    out = Path(out)
    check_out(out)
    config = json.loads((folder / HF_CONFIG_NAME).read_text())
    model_cfg = config["model_cfg"]
    check_representable(model_cfg)
    model = models.create(name)[0]
    if type(model) is not open_clip.CLIP:
        raise not_exact(f"the model is an open_clip {type(model).__name__}, not a CLIP")
    hf = CLIPModel(hf_config(model_cfg, model.logit_scale.item()))
    tensors = hf_state(model.state_dict(), model.visual.transformer.layers, model.transformer.layers)
    hf.load_state_dict(tensors, strict=True)  # every CLIPModel tensor, each once
    size = hf.config.vision_config.image_size
    processor = CLIPProcessor(image_processor=hf_image_processor(config.get("preprocess_cfg", {}), size),
                              tokenizer=hf_tokenizer(model.context_length))

    def write(tmp: Path):
        hf.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        saved = json.loads((tmp / "config.json").read_text())
        (tmp / "config.json").write_text(json.dumps({**saved, **read_nesting(folder)}, indent=2))

    atomic_folder(out, write)
    return json.loads((out / "config.json").read_text())


def main(argv=None):
    args = parse_args(argv)
    config = export_transformers(args.model, Path(args.out))
    dims = config.get("matryoshka_dimensions")
    print(f"wrote {args.out}: transformers CLIPModel, embed {config['projection_dim']}"
          f"{', nested dims ' + ','.join(map(str, dims)) if dims else ''}; load it with "
          f"transformers.CLIPModel.from_pretrained('{args.out}') and CLIPProcessor.from_pretrained('{args.out}')")
    return 0


if __name__ == "__main__":
    from .errors import run_cli

    run_cli(main)
