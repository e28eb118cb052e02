"""Backbone spec string → frozen, loaded `VisionTransformer` with its config and fingerprint.

Spec strings (docs/backbones.md has the full table):
- `random:<preset>[@seed]`  random weights for tests/demos (loud warning);
- `hf-hub:<repo>[@revision]` a Hugging Face Hub repo, fetched with `huggingface_hub.snapshot_download`
  (only the files a ViT needs) and then loaded as a local directory; a Hub out of reach is found out
  within `HF_HUB_ETAG_TIMEOUT` seconds and the local cache used instead;
- a local path: a weights file (.safetensors, .pth/.pt/.bin, .npz) or a directory in the Hugging Face
  transformers layout or timm's hub layout.

Normalisation follows the VPT official code (KMnP/vpt `src/data/transforms.py`: ImageNet mean/std for
every backbone, Jia et al., ECCV 2022, arXiv 2203.12119) for the paper's Google ViT weights, and the
checkpoint's own preprocessing config otherwise; see `_VPT_IMAGENET_NORM_REPOS` and docs/backbones.md.
Pickle is never trusted: `.pth`/`.bin` go through `torch.load(weights_only=True)` and `.npz` through
`numpy.load(allow_pickle=False)`.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import threading
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from vpt.checkpoint import (
    CheckpointError,
    checkpoint_filter_fn,
    convert_to_timm,
    detect_format,
    infer_config,
    npz_num_heads,
    verify_state_dict,
)
from vpt.config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    PRESETS,
    ViTConfig,
    get_preset,
)
from vpt.fingerprint import backbone_fingerprint
from vpt.vit import VisionTransformer

logger = logging.getLogger(__name__)

# First pass of `snapshot_download`: configs plus the safe weight formats. Pickle-based weights are only
# fetched when a repo has nothing else (and are then read with weights_only=True).
HUB_ALLOW_PATTERNS = [
    "config.json",
    "preprocessor_config.json",
    "model.safetensors.index.json",
    "*.safetensors",
    "*.npz",
]
HUB_FALLBACK_PATTERNS = ["*.bin", "*.pth"]
# Google's in21k ViTs: the VPT paper's backbone family. The official VPT code feeds them ImageNet-normalised
# images (not the [-1, 1] their own preprocessor_config.json says), so prompts trained with it only import
# correctly with ImageNet mean/std. The same rule covers every Google .npz file.
_VPT_IMAGENET_NORM_REPOS = re.compile(r"^google/vit-.+-in21k$", re.IGNORECASE)
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")
# Keys that wrap a state dict inside a training checkpoint ({"state_dict": ..., "epoch": ...}).
_WRAPPER_KEYS = ("state_dict", "model")
# timm model_args that change the architecture away from a plain pre-norm CLS-token ViT.
_TIMM_UNSUPPORTED_ARGS = {
    "class_token": lambda v: v is False,
    "no_embed_class": bool,
    "reg_tokens": bool,
    "pre_norm": bool,
    "fc_norm": bool,
    "init_values": lambda v: v is not None,
    "qk_norm": bool,
    "global_pool": lambda v: v not in ("token", "", None),  # "" = no pooling: CLS still at index 0
}


class BackboneUnavailable(CheckpointError):
    """The backbone a spec names cannot be had here: the Hub is out of reach (or does not serve the repo)
    and the local cache has no copy, or the path does not exist. Unlike the other `CheckpointError`s
    there is nothing wrong with a file: the way out is another spec, and `ways_out` names both."""

    def __init__(self, spec: str, reason: str) -> None:
        self.spec = spec  # the spec string as given
        self.reason = reason  # what failed, in one sentence without the spec
        self.ways_out = (  # the specs that need no network, for the caller to offer in its own words
            "a local checkpoint: a path to a .safetensors, .pth/.pt/.bin or .npz file, or to a Hugging Face "
            "or timm model directory",
            "random:<preset>[@seed]: random weights for tests and demos, predictions meaningless "
            f"(presets: {', '.join(PRESETS)})",
        )
        super().__init__(
            f"backbone {spec!r} is unavailable: {reason}. Use {self.ways_out[0]}; or {self.ways_out[1]}"
        )


@dataclass
class Backbone:
    """A loaded frozen backbone and what identifies it."""

    model: VisionTransformer  # eval mode, requires_grad False, on the device/dtype asked for
    cfg: ViTConfig  # architecture, img_size, mean/std, resize_size (== model.cfg)
    fingerprint: str  # "v1:<sha256 hex>" over the fp32 timm-named weights (vpt.fingerprint)
    backbone_id: str  # informative name: repo id, timm architecture, file name or "random:<preset>@<seed>"
    spec: str  # the spec string it was loaded from


def load_backbone(
    spec: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    img_size: int | None = None,
    cache_dir: str | None = None,
) -> Backbone:
    """Load a frozen backbone from a spec string.

    Args:
        spec: `random:<preset>[@seed]`, `hf-hub:<org/name>[@revision]`, or a local file/directory path.
        device: where the model lives.
        dtype: run dtype; the fingerprint is computed before this cast, so it does not depend on it.
        img_size: input side to serve at; the positional embedding is resized (bicubic) when it differs
            from the checkpoint's.
        cache_dir: Hugging Face cache directory for `hf-hub:` specs (default: the HF_HUB_CACHE one).

    Raises:
        BackboneUnavailable: no such path; or an `hf-hub:` repo that is neither on a Hub within reach
            nor in the local cache (offline, `HF_HUB_OFFLINE`, unknown or gated repo or revision).
        CheckpointError: bad spec, unreadable or unrecognised file, or weights that do not fit.
    """
    if spec.startswith("random:"):
        model, cfg, fp, backbone_id = _load_random(spec[len("random:") :], img_size)
    else:
        if spec.startswith("hf-hub:"):
            path, repo_id = _download(spec, cache_dir)
            sd, cfg, backbone_id = _read_dir(path, repo_id)
        else:
            path = Path(spec).expanduser()
            if path.is_dir():
                sd, cfg, backbone_id = _read_dir(path, _repo_id_from_cache_path(path))
            elif path.is_file():
                sd, cfg, backbone_id = _read_file(path)
            else:
                raise BackboneUnavailable(
                    spec,
                    f"no such file or directory ({path.absolute()}; a spec is random:<preset>[@seed], "
                    "hf-hub:<repo>[@revision] or a path)",
                )
        model, cfg, fp = _build(sd, cfg, img_size)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Backbone(model=model, cfg=cfg, fingerprint=fp, backbone_id=backbone_id, spec=spec)


# ------------------------------------------------------------------------------------------ random
def _load_random(rest: str, img_size: int | None) -> tuple[VisionTransformer, ViTConfig, str, str]:
    name, _, seed_s = rest.partition("@")
    try:
        seed = int(seed_s) if seed_s else 0
        cfg = get_preset(name)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"bad random backbone spec {'random:' + rest!r}: {e}") from None
    if img_size is not None:
        cfg = _with_img_size(cfg, img_size)
    # Built on the meta device and materialised on the CPU: the default nn.Linear init would draw from
    # the *global* RNG (a side effect on the caller), and a CPU generator gives the same weights
    # whatever device the model is then moved to.
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    model = model.to_empty(device="cpu").init_random(torch.Generator().manual_seed(seed))
    backbone_id = f"random:{name}@{seed}"
    logger.warning(
        "!!! RANDOM BACKBONE WEIGHTS: %s is randomly initialised — its features and every prompt "
        "trained on it are meaningless outside tests and demos !!!",
        backbone_id,
    )
    return model, cfg, backbone_fingerprint(model.state_dict()), backbone_id


# ------------------------------------------------------------------------------------------ hub
def _download(spec: str, cache_dir: str | None) -> tuple[Path, str]:
    """The repo's snapshot directory: downloaded, or from the cache when the Hub is out of reach."""
    from huggingface_hub import constants, snapshot_download  # imported here: only hf-hub specs need it
    from huggingface_hub.errors import LocalEntryNotFoundError

    rest = spec[len("hf-hub:") :]
    repo_id, _, revision = rest.partition("@")
    if repo_id.count("/") != 1:
        raise CheckpointError(f"hf-hub spec needs <org>/<name>[@revision], got {rest!r}")
    kwargs = {"repo_id": repo_id, "revision": revision or None, "cache_dir": cache_dir}
    cache = cache_dir or constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set"
    else:
        why = _hub_out_of_reach(spec, repo_id, revision or None, constants.ENDPOINT)
    if why is not None:
        kwargs["local_files_only"] = True  # snapshot_download would try the Hub again, without a timeout
    try:
        path = Path(snapshot_download(allow_patterns=HUB_ALLOW_PATTERNS, **kwargs))
        if not _has_safe_weights(path):
            logger.warning(
                "%s has no .safetensors/.npz weights; falling back to .bin/.pth (weights_only)", repo_id
            )
            path = Path(
                snapshot_download(allow_patterns=HUB_ALLOW_PATTERNS + HUB_FALLBACK_PATTERNS, **kwargs)
            )
    except LocalEntryNotFoundError as e:
        reason = (
            f"{why or 'the Hugging Face Hub could not be used'}, and the local cache ({cache}) has no copy"
        )
        raise BackboneUnavailable(spec, reason) from e  # the chain: for VPT_LOG_LEVEL=debug
    if why is not None:
        logger.warning("%s: %s; using the copy in the local cache (%s)", spec, why, path)
    return path, repo_id + (f"@{revision}" if revision else "")


def _hub_out_of_reach(spec: str, repo_id: str, revision: str | None, endpoint: str) -> str | None:
    """None if the Hub answers for the repo; else why not, within `HF_HUB_ETAG_TIMEOUT` seconds.

    `snapshot_download`'s first request has no timeout: an endpoint that accepts the connection and
    never answers (a firewall, a dead proxy) holds it forever, and name resolution is never bounded.
    Hence this probe, one metadata request in a daemon thread waited for at most the timeout. Raises
    `BackboneUnavailable` when the Hub answers that the repo or revision is not there for us.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    timeout = float(constants.HF_HUB_ETAG_TIMEOUT)
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            HfApi(endpoint=endpoint).repo_info(repo_id, revision=revision, timeout=timeout)
            outcome.append(None)
        except Exception as e:  # reported below: the transport's own errors vary with the library
            outcome.append(e)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)  # daemon: may stay blocked
    thread.start()
    thread.join(timeout + 1.0)  # + the request's own timeout firing
    if not outcome:
        return f"the Hugging Face Hub ({endpoint}) did not answer within {timeout:g} s"
    error = outcome[0]
    if error is None:
        return None
    if isinstance(error, GatedRepoError):
        raise BackboneUnavailable(
            spec, f"{repo_id} is gated: accept its terms on the Hub and set HF_TOKEN"
        ) from error
    if isinstance(error, RepositoryNotFoundError):
        raise BackboneUnavailable(
            spec, f"the Hugging Face Hub has no repo {repo_id!r} (or it is private: set HF_TOKEN)"
        ) from error
    if isinstance(error, RevisionNotFoundError):
        raise BackboneUnavailable(spec, f"{repo_id} has no revision {revision!r}") from error
    detail = str(error).splitlines()[0] if str(error) else ""
    return f"the Hugging Face Hub ({endpoint}) is out of reach ({type(error).__name__}: {detail})"


def _has_safe_weights(path: Path) -> bool:
    return any(p.suffix in (".safetensors", ".npz") for p in path.iterdir())


def _repo_id_from_cache_path(path: Path) -> str | None:
    """`.../models--google--vit-base-patch16-224-in21k/snapshots/<commit>` → the repo id, so a snapshot
    loaded by path gets the same normalisation rule as the hf-hub: spec that downloaded it."""
    for part in path.resolve().parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return "/".join(part[len("models--") :].split("--", 1))
    return None


# ------------------------------------------------------------------------------------------ files
def read_state_dict(path: str | Path) -> dict[str, Tensor | np.ndarray]:
    """Raw tensors of one weights file, never unpickling anything but tensors (see module docstring)."""
    path = Path(path)
    name = path.name
    if name.endswith(".safetensors.index.json"):
        return _read_sharded(path)
    if path.suffix == ".safetensors":
        try:
            return dict(load_file(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
    if path.suffix in (".pth", ".pt", ".bin"):
        return _read_torch(path)
    if path.suffix == ".npz":
        return _read_npz(path)
    raise CheckpointError(
        f"{path}: unsupported checkpoint format (expected one of {', '.join(_WEIGHT_SUFFIXES)})"
    )


def _read_sharded(index: Path) -> dict[str, Tensor | np.ndarray]:
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
    out: dict[str, Tensor | np.ndarray] = {}
    for f in files:
        out.update(read_state_dict(index.parent / f))
    return out


def _read_torch(path: Path) -> dict[str, Tensor | np.ndarray]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only=True refuses any global outside torch's allow-list, so arbitrary code never runs.
        # Only torch's one-line reason is kept: its advice to allow-list the global is not ours to give.
        m = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed global|\n|$)", str(e))
        detail = m.group(1) if m else str(e).splitlines()[0]
        raise CheckpointError(
            f"{path}: refused — it pickles objects other than tensors and plain containers ({detail}); "
            "unpickling it could run arbitrary code (torch.load weights_only=True). Re-save it as .safetensors"
        ) from None
    except Exception as e:  # torch raises KeyError/EOFError/RuntimeError/... on files it cannot parse
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}: {e})") from None
    for _ in range(2):  # {"model": {"state_dict": ...}} occurs in the wild
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is not None:
                obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(
            f"{path}: state dict entries that are not tensors: {', '.join(map(str, bad[:8]))}"
        )
    return dict(obj)


def _read_npz(path: Path) -> dict[str, Tensor | np.ndarray]:
    # numpy takes anything that is not a zip for a pickle: say what the file really is first.
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a .npz archive (no zip structure)")
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except ValueError as e:
        if "pickle" in str(e).lower():  # object arrays can only be unpickled: never done
            raise CheckpointError(
                f"{path}: refused — it holds object arrays, which need pickle to load"
            ) from None
        raise CheckpointError(f"{path}: unreadable .npz member ({e})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path}: not a .npz archive ({e})") from None
    bad = [k for k, v in out.items() if v.dtype.kind != "f"]
    if bad:
        raise CheckpointError(f"{path}: non-float arrays in a weights archive: {', '.join(bad[:8])}")
    return out


def _read_file(path: Path) -> tuple[dict[str, Tensor], ViTConfig, str]:
    """A bare weights file: the architecture comes from the weights, heads from a preset (or the npz)."""
    raw = read_state_dict(path)
    fmt = detect_format(raw)
    overrides: dict[str, object] = {}
    if fmt == "npz":
        heads = npz_num_heads(raw)
        if heads is not None:
            overrides["num_heads"] = heads
        # Google's weights as the VPT paper used them: ImageNet mean/std (module docstring); Flax's
        # LayerNorm epsilon is 1e-6.
        overrides.update(mean=IMAGENET_MEAN, std=IMAGENET_STD, layer_norm_eps=1e-6)
    elif fmt == "hf":
        overrides["layer_norm_eps"] = 1e-12  # transformers' ViTConfig default; there is no config to ask
    sd = convert_to_timm(raw)
    return sd, infer_config(sd, **overrides), path.name


# ------------------------------------------------------------------------------------------ dirs
def _find_weights(path: Path) -> Path:
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        if (path / name).is_file():
            return path / name
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if len(found) == 1:
        return found[0]
    listing = ", ".join(p.name for p in found) or "none"
    raise CheckpointError(f"{path}: cannot tell which weights file to load (candidates: {listing})")


def _read_dir(path: Path, repo_id: str | None) -> tuple[dict[str, Tensor], ViTConfig, str]:
    config_path = path / "config.json"
    if not config_path.is_file():
        sd, cfg, _ = _read_file(_find_weights(path))
        return sd, cfg, repo_id or path.name
    try:
        conf = json.loads(config_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{config_path}: invalid JSON ({e})") from None
    if isinstance(conf, dict) and "architecture" in conf and "pretrained_cfg" in conf:
        return _read_timm_dir(path, conf, repo_id)
    if isinstance(conf, dict) and conf.get("model_type") == "vit":
        return _read_hf_dir(path, conf, repo_id)
    kind = conf.get("model_type") if isinstance(conf, dict) else type(conf).__name__
    raise CheckpointError(
        f"{config_path}: neither a Hugging Face ViT config (model_type 'vit', got {kind!r}) "
        "nor a timm hub config (architecture + pretrained_cfg)"
    )


def _square(value: object, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise CheckpointError(f"{what} {value} is not square; only square inputs are supported")
        value = value[0]
    if not isinstance(value, int):
        raise CheckpointError(f"{what} must be an integer, got {value!r}")
    return value


def _read_hf_dir(path: Path, conf: dict, repo_id: str | None) -> tuple[dict[str, Tensor], ViTConfig, str]:
    if conf.get("hidden_act", "gelu") != "gelu":  # our MLP is exact-erf GELU only
        raise CheckpointError(
            f"{path}/config.json: hidden_act {conf['hidden_act']!r} unsupported (only 'gelu')"
        )
    hidden, inter = int(conf.get("hidden_size", 768)), int(conf.get("intermediate_size", 3072))
    mean, std = INCEPTION_MEAN, INCEPTION_STD  # transformers' ViTImageProcessor defaults
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        p = json.loads(pre.read_text())
        mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
    if repo_id and _VPT_IMAGENET_NORM_REPOS.match(repo_id):
        logger.info(
            "%s: using ImageNet mean/std as the official VPT code does (not its preprocessor's)", repo_id
        )
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    declared = _config(
        path,
        img_size=_square(conf.get("image_size", 224), "image_size"),
        patch_size=_square(conf.get("patch_size", 16), "patch_size"),
        in_chans=int(conf.get("num_channels", 3)),
        embed_dim=hidden,
        depth=int(conf.get("num_hidden_layers", 12)),
        num_heads=int(conf.get("num_attention_heads", 12)),
        mlp_ratio=inter / hidden,
        qkv_bias=bool(conf.get("qkv_bias", True)),
        layer_norm_eps=float(conf.get("layer_norm_eps", 1e-12)),
        mean=mean,
        std=std,
    )
    sd = convert_to_timm(read_state_dict(_find_weights(path)))
    _check_declared(declared, infer_config(sd), path / "config.json")
    return sd, declared, repo_id or path.name


def _read_timm_dir(path: Path, conf: dict, repo_id: str | None) -> tuple[dict[str, Tensor], ViTConfig, str]:
    arch = str(conf["architecture"])
    pcfg, args = conf.get("pretrained_cfg") or {}, conf.get("model_args") or {}
    # timm's hub config.json has global_pool at the top level; model_args (when present) overrides it.
    options = {**({"global_pool": conf["global_pool"]} if "global_pool" in conf else {}), **args}
    for key, unsupported in _TIMM_UNSUPPORTED_ARGS.items():
        if key in options and unsupported(options[key]):
            raise CheckpointError(
                f"{path}/config.json: timm option {key}={options[key]!r} is not a plain CLS-token ViT"
            )
    sd = convert_to_timm(read_state_dict(_find_weights(path)))
    inferred = infer_config(sd)
    base = arch.split(".")[0]
    try:
        preset_heads = get_preset(base).num_heads
    except KeyError:
        preset_heads = inferred.num_heads
    input_size = pcfg.get("input_size", [3, inferred.img_size, inferred.img_size])
    fields = {**inferred.to_dict(), "resize_size": 0}  # 0: recomputed from the declared img_size
    fields.update(
        img_size=_square(list(input_size[1:]), "pretrained_cfg.input_size"),
        num_heads=int(args.get("num_heads", preset_heads)),
        layer_norm_eps=1e-6,  # timm's ViT LayerNorm
        mean=tuple(pcfg.get("mean", IMAGENET_MEAN)),
        std=tuple(pcfg.get("std", IMAGENET_STD)),
    )
    declared = _config(path, **fields)
    _check_declared(declared, inferred, path / "config.json")
    tag = pcfg.get("tag")
    backbone_id = repo_id or (f"{arch}.{tag}" if tag and "." not in arch else arch)
    return sd, declared, backbone_id


def _config(path: Path, **fields: object) -> ViTConfig:
    try:
        return ViTConfig(**fields)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json describes an invalid ViT: {e}") from None


def _check_declared(declared: ViTConfig, inferred: ViTConfig, where: Path) -> None:
    """A config that disagrees with its weights is an error, not something to paper over by resizing."""
    fields = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "mlp_ratio", "qkv_bias")
    bad = [f"{f}: config {getattr(declared, f)} vs weights {getattr(inferred, f)}" for f in fields
           if getattr(declared, f) != getattr(inferred, f)]  # fmt: skip
    if bad:
        raise CheckpointError(f"{where} disagrees with its weights: {'; '.join(bad)}")


# ------------------------------------------------------------------------------------------ build
def _with_img_size(cfg: ViTConfig, img_size: int) -> ViTConfig:
    try:
        return cfg.replace(img_size=img_size)  # resize_size recomputed for the new side
    except ValueError as e:
        raise CheckpointError(f"cannot serve at img_size={img_size}: {e}") from None


def _build(
    sd: dict[str, Tensor], cfg: ViTConfig, img_size: int | None
) -> tuple[VisionTransformer, ViTConfig, str]:
    if img_size is not None and img_size != cfg.img_size:
        cfg = _with_img_size(cfg, img_size)
    sd = {k: v.to(torch.float32) for k, v in checkpoint_filter_fn(sd, cfg).items()}
    with torch.device("meta"):  # no init work or memory for weights about to be replaced
        model = VisionTransformer(cfg)
    verify_state_dict(sd, {k: v.shape for k, v in model.state_dict().items()})
    fingerprint = backbone_fingerprint(sd)  # after conversion and resize, before the run-dtype cast
    model.load_state_dict(sd, strict=True, assign=True)
    return model, cfg, fingerprint
