"""Import prompts trained with the official VPT code (KMnP/vpt) as task artifacts.

Jia et al., "Visual Prompt Tuning", ECCV 2022 (arXiv 2203.12119). The official code never saves a
servable model (KMnP/vpt issue #46); it leaves two kinds of files:

1. per-epoch prompt files `prompt_ep{N}.pth` (`Trainer.save_prompt`, MODEL.PROMPT.SAVE_FOR_EACH_EPOCH):
   `{"shallow_prompt": (1, P, D), "deep_prompt": (L-1, P, D)}` as **numpy arrays**; `deep_prompt` is
   absent for VPT-shallow. They hold no head.
2. model state dicts (fvcore `Checkpointer`, MODEL.SAVE_CKPT; possibly wrapped as {"model": ...} or
   {"state_dict": ...}, possibly with DDP's "module." prefix):
   `enc.transformer.prompt_embeddings` (1, P, D), `enc.transformer.deep_prompt_embeddings` (L-1, P, D),
   `head.last_layer.weight` (C, D), `head.last_layer.bias` (C,), plus the frozen backbone's weights.

Official deep prompts are `prompt_embeddings` for layer 0 and `deep_prompt_embeddings[i-1]` for layer
i >= 1 (`PromptedTransformer.forward_deep_prompt`), so our (L, P, D) table is their concatenation.

Files are read only with `torch.load(weights_only=True)`, which cannot run code. The numpy arrays of
prompt files need three numpy globals allow-listed (array reconstruction and dtype, no callables of
our choosing); object arrays are still refused because their elements would need further globals.

Refused on purpose:
- `prompt_proj` weights (MODEL.PROMPT.PROJECT > -1): the inserted tokens are then
  `prompt_proj(prompt_embeddings)`, not the stored embeddings; the default config (PROJECT = -1) uses
  an Identity and stores none. Folding the projection in would be exact but is not implemented.
- heads with hidden layers (MODEL.MLP_NUM > 0, `head.projection.*`): the server applies one linear head.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from prompt_store.artifact import BackboneSignature, TaskArtifact, validate_for_backbone

PROMPT_KEY = "enc.transformer.prompt_embeddings"
DEEP_PROMPT_KEY = "enc.transformer.deep_prompt_embeddings"
PROJ_PREFIX = "enc.transformer.prompt_proj."
HEAD_WEIGHT_KEY = "head.last_layer.weight"
HEAD_BIAS_KEY = "head.last_layer.bias"
HEAD_MLP_PREFIX = "head.projection."
FILE_SHALLOW_KEY = "shallow_prompt"
FILE_DEEP_KEY = "deep_prompt"
_WRAPPERS = ("model", "state_dict")

ImportMode = Literal["shallow", "deep", "linear"]


class OfficialImportError(ValueError):
    """The file cannot be imported; the message says why and, where possible, which flag helps."""


@dataclass
class OfficialTask:
    """What an official file holds, in our layout."""

    prompts: Tensor  # (L_p, P, D) float32; (1, 0, D) for a linear probe
    mode: ImportMode
    head_weight: Tensor | None  # (C, D), None when the file has no head (prompt files)
    head_bias: Tensor | None  # (C,)
    kind: str  # "prompt file" | "state dict", for messages


def _numpy_safe_globals() -> list[Any]:
    """numpy globals a pickled float ndarray needs, under numpy 2 and numpy 1 names."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    allowed: list[Any] = [
        _reconstruct,
        (_reconstruct, "numpy.core.multiarray._reconstruct"),  # files written under numpy 1.x
        (_reconstruct, "numpy._core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
    ]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:  # numpy >= 1.25 pickles dtypes via their classes
        allowed += [dtypes.Float16DType, dtypes.Float32DType, dtypes.Float64DType]
    return allowed


def safe_load(path: str | Path) -> Any:
    """`torch.load(weights_only=True)` with float numpy arrays allowed; anything else is refused."""
    path = Path(path)
    if not path.is_file():
        raise OfficialImportError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed global|\n|$)", str(e))
        detail = m.group(1) if m else str(e).splitlines()[0]
        raise OfficialImportError(
            f"{path}: refused — it pickles objects other than tensors/arrays ({detail}); loading it could "
            "run arbitrary code, so it is only read with torch.load(weights_only=True)"
        ) from None
    except Exception as e:  # zip / EOF / format errors of torch's reader
        raise OfficialImportError(f"{path}: not a PyTorch file ({type(e).__name__}: {e})") from None


def _tensor(value: Any, key: str) -> Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype.kind != "f":
            raise OfficialImportError(f"{key}: expected a float array, got dtype {value.dtype}")
        value = torch.from_numpy(value.copy())
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise OfficialImportError(f"{key}: expected a float tensor, got {type(value).__name__}")
    return value.detach().to(torch.float32)


def _unwrap(obj: Any) -> Mapping[str, Any]:
    for _ in range(2):  # {"model": {...}} from fvcore's Checkpointer, {"state_dict": ...} elsewhere
        if isinstance(obj, Mapping) and not any(
            k in obj for k in (PROMPT_KEY, FILE_SHALLOW_KEY, HEAD_WEIGHT_KEY)
        ):
            inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
            if inner is not None:
                obj = inner
    if not isinstance(obj, Mapping):
        raise OfficialImportError(f"expected a dict of tensors, got {type(obj).__name__}")
    # DistributedDataParallel saves every key under "module."
    if obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _check_prompt_shapes(shallow: Tensor, deep: Tensor | None, where: str) -> None:
    if shallow.ndim != 3 or shallow.shape[0] != 1:
        raise OfficialImportError(f"{where}: shallow prompts must be (1, P, D), got {tuple(shallow.shape)}")
    if deep is not None and (deep.ndim != 3 or deep.shape[1:] != shallow.shape[1:]):
        raise OfficialImportError(
            f"{where}: deep prompts must be (L-1, P, D) = (L-1, {shallow.shape[1]}, {shallow.shape[2]}), "
            f"got {tuple(deep.shape)}"
        )


def parse_official(obj: Any, where: str = "file") -> OfficialTask:
    """Recognise an official prompt file or model state dict (already loaded) by its keys."""
    sd = _unwrap(obj)
    keys = set(sd)
    if any(isinstance(k, str) and k.startswith(PROJ_PREFIX) for k in keys):
        raise OfficialImportError(
            f"{where}: carries prompt_proj weights (trained with MODEL.PROMPT.PROJECT > -1): the official "
            "model inserts prompt_proj(prompt_embeddings), not the stored embeddings; only the default "
            "PROJECT = -1 (identity) is supported"
        )
    if any(isinstance(k, str) and k.startswith(HEAD_MLP_PREFIX) and "last_layer" not in k for k in keys):
        raise OfficialImportError(
            f"{where}: the head has hidden layers (MODEL.MLP_NUM > 0); only a linear head can be served"
        )

    head_w = head_b = None
    if HEAD_WEIGHT_KEY in keys or HEAD_BIAS_KEY in keys:
        if HEAD_WEIGHT_KEY not in keys or HEAD_BIAS_KEY not in keys:
            raise OfficialImportError(f"{where}: has only one of {HEAD_WEIGHT_KEY} / {HEAD_BIAS_KEY}")
        head_w, head_b = (
            _tensor(sd[HEAD_WEIGHT_KEY], HEAD_WEIGHT_KEY),
            _tensor(sd[HEAD_BIAS_KEY], HEAD_BIAS_KEY),
        )

    if FILE_SHALLOW_KEY in keys:
        shallow = _tensor(sd[FILE_SHALLOW_KEY], FILE_SHALLOW_KEY)
        deep = _tensor(sd[FILE_DEEP_KEY], FILE_DEEP_KEY) if FILE_DEEP_KEY in keys else None
        kind = "prompt file"
    elif PROMPT_KEY in keys:
        shallow = _tensor(sd[PROMPT_KEY], PROMPT_KEY)
        deep = _tensor(sd[DEEP_PROMPT_KEY], DEEP_PROMPT_KEY) if DEEP_PROMPT_KEY in keys else None
        kind = "state dict"
    elif head_w is not None:
        # A state dict without prompts: an official linear probe (TRANSFER_TYPE linear).
        D = head_w.shape[-1]
        return OfficialTask(torch.zeros(1, 0, D), "linear", head_w, head_b, "state dict")
    else:
        shown = ", ".join(sorted(str(k) for k in keys)[:6]) or "nothing"
        raise OfficialImportError(
            f"{where}: not an official VPT file: expected '{FILE_SHALLOW_KEY}' (per-epoch prompt file) or "
            f"'{PROMPT_KEY}' (model state dict); found {shown}"
        )
    _check_prompt_shapes(shallow, deep, where)
    prompts = torch.cat([shallow, deep]) if deep is not None else shallow  # (L_p, P, D)
    return OfficialTask(prompts, "deep" if deep is not None else "shallow", head_w, head_b, kind)


def read_official(path: str | Path) -> OfficialTask:
    return parse_official(safe_load(path), str(path))


def read_head(path: str | Path) -> tuple[Tensor, Tensor]:
    """A head from a separate file: an official state dict or `{"weight", "bias"}`."""
    sd = _unwrap(safe_load(path))
    for wk, bk in (
        (HEAD_WEIGHT_KEY, HEAD_BIAS_KEY),
        ("last_layer.weight", "last_layer.bias"),
        ("weight", "bias"),
    ):
        if wk in sd and bk in sd:
            return _tensor(sd[wk], wk), _tensor(sd[bk], bk)
    raise OfficialImportError(
        f"{path}: no head found (expected '{HEAD_WEIGHT_KEY}'/'{HEAD_BIAS_KEY}' or 'weight'/'bias')"
    )


def parse_labels(spec: str | None, num_classes: int | None, C: int) -> list[str]:
    """`--labels FILE` (one per line, or a JSON list), `--labels a,b,c`, or `--num-classes` → C labels."""
    if spec is not None:
        p = Path(spec)
        if p.is_file():
            text = p.read_text(encoding="utf-8")
            if text.lstrip().startswith("["):
                labels = json.loads(text)
                if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                    raise OfficialImportError(f"{p}: a JSON labels file must hold a list of strings")
            else:
                labels = [line.strip() for line in text.splitlines() if line.strip()]
        else:
            labels = [s.strip() for s in spec.split(",")]
        if len(labels) != C:
            raise OfficialImportError(f"--labels gives {len(labels)} labels but the head has {C} classes")
        return labels
    if num_classes is not None and num_classes != C:
        raise OfficialImportError(f"--num-classes {num_classes} but the head has {C} classes")
    return [str(i) for i in range(C)]


def official_to_artifact(
    task: OfficialTask,
    sig: BackboneSignature,
    *,
    labels: str | None = None,
    num_classes: int | None = None,
    head: tuple[Tensor, Tensor] | None = None,
    mode: ImportMode | None = None,
    name: str | None = None,
    description: str | None = None,
    source: str = "",
) -> TaskArtifact:
    """Check an imported task against the backbone and build the artifact (validated for it)."""
    if mode is not None and mode != task.mode:
        hint = " (the file has no prompts)" if task.mode == "linear" else ""
        raise OfficialImportError(
            f"--mode {mode} but the {task.kind} holds a VPT-{task.mode} task{hint}; converting would change "
            "its predictions, so the mode must match"
        )
    if head is not None:
        if task.head_weight is not None:
            raise OfficialImportError(f"--head given but the {task.kind} already carries a head")
        head_w, head_b = head
    elif task.head_weight is not None:
        head_w, head_b = task.head_weight, task.head_bias
    else:
        raise OfficialImportError(
            f"the {task.kind} holds no head (official per-epoch prompt files never do): pass --head FILE "
            "with head.last_layer.weight/bias (e.g. the model checkpoint saved with MODEL.SAVE_CKPT)"
        )
    assert head_b is not None
    n_layers, _, dim = task.prompts.shape
    if dim != sig.embed_dim:
        raise OfficialImportError(
            f"prompt width D={dim} does not match the backbone's embed_dim={sig.embed_dim} ({sig.backbone_id})"
        )
    if task.mode == "deep" and n_layers != sig.depth:
        raise OfficialImportError(
            f"deep prompts cover {n_layers} layers (1 + {n_layers - 1} deep) but the backbone has depth {sig.depth}"
        )
    if head_w.ndim != 2 or head_w.shape[1] != sig.embed_dim or head_b.shape != (head_w.shape[0],):
        raise OfficialImportError(
            f"head must be weight (C, {sig.embed_dim}) and bias (C,), got {tuple(head_w.shape)} and "
            f"{tuple(head_b.shape)}"
        )
    C = head_w.shape[0]
    artifact = TaskArtifact(
        prompts=task.prompts.contiguous(),
        head_weight=head_w.contiguous(),
        head_bias=head_b.contiguous(),
        mode="deep" if task.mode == "deep" else "shallow",
        backbone=sig.backbone_id,
        backbone_fingerprint=sig.fingerprint,
        labels=parse_labels(labels, num_classes, C),
        name=name,
        description=description,
        train_summary={
            "trainer": "KMnP/vpt (imported)",
            "source": source,
            "kind": task.kind,
            "mode": task.mode,
        },
    )
    validate_for_backbone(artifact, sig)
    return artifact
