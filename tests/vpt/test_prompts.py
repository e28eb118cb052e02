"""VPT prompt semantics against a plain reference written the way the paper's code does it.

Reference: KMnP/vpt `src/models/vit_prompt/vit.py` (`incorporate_prompt`, `forward_deep_prompt`): one
task's prompts broadcast to the whole batch, concatenated after CLS (after the positional embedding);
deep prompts replace the prompt positions before every layer >= 1; final norm; CLS feature.
"""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from vpt import HeadBatch, PromptBatch, VisionTransformer
from vpt.prompts import PromptKV

TOL = 1e-5


def reference_features(model: VisionTransformer, images: torch.Tensor, prompts: torch.Tensor, deep: bool):
    """One task, prompts (L_p, P, D) broadcast to the batch — the official code's algorithm."""
    B = images.shape[0]
    P = prompts.shape[1]
    x = model.embed(images)  # CLS + patches, positional embedding already added
    x = torch.cat([x[:, :1], prompts[0].expand(B, -1, -1), x[:, 1:]], dim=1)
    for i, blk in enumerate(model.blocks):
        if deep and i > 0:
            x = torch.cat([x[:, :1], prompts[i].expand(B, -1, -1), x[:, 1 + P :]], dim=1)
        x = blk(x)
    return model.norm(x)[:, 0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("P", [1, 7])
def test_single_task_matches_reference(tiny_vit, images, deep, P):
    D, L = tiny_vit.cfg.embed_dim, tiny_vit.cfg.depth
    prompts = torch.randn(L if deep else 1, P, D, generator=torch.Generator().manual_seed(P))
    ours = tiny_vit(images, PromptBatch.single_task(prompts, images.shape[0], deep=deep))
    ref = reference_features(tiny_vit, images, prompts, deep)
    assert rel_err(ours, ref) <= TOL


def test_shallow_and_deep_differ(tiny_vit, images):
    """Guards the reference itself: deep replacement must change the result."""
    D, L = tiny_vit.cfg.embed_dim, tiny_vit.cfg.depth
    prompts = torch.randn(L, 5, D, generator=torch.Generator().manual_seed(0))
    shallow = tiny_vit(images, PromptBatch.single_task(prompts[:1], images.shape[0], deep=False))
    deep = tiny_vit(images, PromptBatch.single_task(prompts, images.shape[0], deep=True))
    assert rel_err(shallow, deep) > 1e-3


def test_prompts_get_no_positional_embedding(tiny_vit, images):
    """Shifting pos_embed changes patch/CLS tokens only; prompts inserted after it are untouched."""
    D = tiny_vit.cfg.embed_dim
    prompts = torch.randn(1, 3, D, generator=torch.Generator().manual_seed(0))
    pb = PromptBatch.single_task(prompts, images.shape[0], deep=False)
    x = tiny_vit.embed(images)
    seq = torch.cat([x[:, :1], pb.layer(0), x[:, 1:]], dim=1)
    assert torch.equal(seq[:, 1:4], prompts.expand(images.shape[0], -1, -1))


@pytest.mark.parametrize("deep", [False, True])
def test_zero_length_prompts_equal_plain_backbone(tiny_vit, images, deep):
    D, L = tiny_vit.cfg.embed_dim, tiny_vit.cfg.depth
    empty = torch.zeros(L if deep else 1, 0, D)
    plain = tiny_vit(images)
    assert torch.equal(tiny_vit(images, PromptBatch.single_task(empty, images.shape[0], deep=deep)), plain)


def _make_tasks(D: int, L: int):
    """(prompts, deep, num_classes) for tasks with different prompt lengths, modes and class counts."""
    g = torch.Generator().manual_seed(42)
    specs = [(5, True, 3), (2, False, 7), (0, False, 4), (9, True, 5), (5, False, 2)]
    return [(torch.randn(L if deep else 1, P, D, generator=g), deep, C) for P, deep, C in specs]


def _bank(tasks, D: int, L: int):
    """Pack tasks into padded tables the way a prompt bank does (zeros past each task's length)."""
    Pmax = max(p.shape[1] for p, _, _ in tasks)
    Cmax = max(c for _, _, c in tasks)
    table = torch.zeros(len(tasks), L, Pmax, D)
    g = torch.Generator().manual_seed(7)
    heads_w = torch.zeros(len(tasks), Cmax, D)
    heads_b = torch.zeros(len(tasks), Cmax)
    solo_heads = []
    for s, (p, _, C) in enumerate(tasks):
        table[s, : p.shape[0], : p.shape[1]] = p
        w, b = torch.randn(C, D, generator=g), torch.randn(C, generator=g)
        heads_w[s, :C], heads_b[s, :C] = w, b
        solo_heads.append((w, b))
    return table, heads_w, heads_b, solo_heads


def test_batch_invariance_mixed_tasks(tiny_vit):
    """Every sample of a mixed batch (different tasks, lengths, modes, class counts) gets its solo logits."""
    D, L = tiny_vit.cfg.embed_dim, tiny_vit.cfg.depth
    tasks = _make_tasks(D, L)
    table, hw, hb, solo_heads = _bank(tasks, D, L)
    slots = torch.tensor([0, 1, 2, 3, 4, 3, 1, 0, 2, 4])  # 10 samples, 5 tasks
    images = torch.randn(len(slots), 3, 32, 32, generator=torch.Generator().manual_seed(3))
    lengths = [tasks[s][0].shape[1] for s in slots.tolist()]
    deep = [tasks[s][1] for s in slots.tolist()]
    ncls = torch.tensor([tasks[s][2] for s in slots.tolist()])
    pb = PromptBatch.build(table, slots, lengths, deep)
    assert not pb.uniform
    logits = tiny_vit(images, pb, HeadBatch(hw, hb, slots, ncls))
    worst = 0.0
    for b, s in enumerate(slots.tolist()):
        prompts, is_deep, C = tasks[s]
        w, bias = solo_heads[s]
        feats = reference_features(tiny_vit, images[b : b + 1], prompts, is_deep)
        solo = feats @ w.T + bias
        assert torch.isinf(logits[b, C:]).all() and (logits[b, C:] < 0).all()
        worst = max(worst, rel_err(logits[b : b + 1, :C], solo))
    assert worst <= TOL, worst


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_half_precision_mixed_batch_follows_fp32(tiny_vit, dtype, tol):
    """The model runs in bf16/fp16 (the server's GPU dtypes) on the masked, mixed-task path: outputs in
    that dtype, finite, and within the dtype's rounding of the fp32 result (measured: bf16 5.0e-3,
    fp16 7.9e-4 relative)."""
    D, L = tiny_vit.cfg.embed_dim, tiny_vit.cfg.depth
    tasks = _make_tasks(D, L)
    table, hw, hb, _ = _bank(tasks, D, L)
    slots = torch.tensor([0, 1, 2, 3, 4, 3])
    images = torch.randn(len(slots), 3, 32, 32, generator=torch.Generator().manual_seed(4))
    lengths = [tasks[s][0].shape[1] for s in slots.tolist()]
    deep = [tasks[s][1] for s in slots.tolist()]
    ncls = torch.tensor([tasks[s][2] for s in slots.tolist()])
    want = tiny_vit(images, PromptBatch.build(table, slots, lengths, deep), HeadBatch(hw, hb, slots, ncls))
    half = copy.deepcopy(tiny_vit).to(dtype)
    pb = PromptBatch.build(table.to(dtype), slots, lengths, deep)
    got = half(images.to(dtype), pb, HeadBatch(hw.to(dtype), hb.to(dtype), slots, ncls))
    assert got.dtype == dtype and not pb.uniform
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)  # padded classes stay -inf, nothing else overflows
    assert rel_err(got[finite].float(), want[finite]) <= tol


def test_uniform_lengths_take_unmasked_path_and_agree(tiny_vit):
    D, L = tiny_vit.cfg.embed_dim, tiny_vit.cfg.depth
    g = torch.Generator().manual_seed(5)
    table = torch.randn(3, L, 4, D, generator=g)
    slots = torch.tensor([0, 1, 2, 1])
    images = torch.randn(4, 3, 32, 32, generator=g)
    pb = PromptBatch.build(table, slots, [4] * 4, [True, False, True, False])
    assert pb.uniform
    fast = tiny_vit(images, pb)
    masked = PromptBatch.build(table, slots, [4] * 4, [True, False, True, False])
    masked.uniform = False  # force the masked path on the same data
    assert rel_err(tiny_vit(images, masked), fast) <= TOL
    # The point of the flag: a uniform batch calls SDPA without a mask (fused kernels), a ragged one with.
    assert attention_masks(tiny_vit, images, pb) == [False] * L
    assert attention_masks(tiny_vit, images, masked) == [True] * L
    ragged = PromptBatch.build(table, slots, [4, 2, 4, 4], [True, False, True, False])
    assert not ragged.uniform and attention_masks(tiny_vit, images, ragged) == [True] * L


def attention_masks(model, images, prompts) -> list[bool]:
    """Whether each of the model's SDPA calls got an attention mask, in call order."""
    seen: list[bool] = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("attn_mask") is not None)
        return sdpa(*args, **kwargs)

    with mock.patch.object(F, "scaled_dot_product_attention", spy):
        model(images, prompts)
    return seen


def test_prompt_length_over_table_is_refused(tiny_vit):
    table = torch.zeros(1, 1, 3, tiny_vit.cfg.embed_dim)
    with pytest.raises(ValueError, match="exceeds"):
        PromptBatch.build(table, torch.tensor([0]), [4], [False])


@pytest.mark.parametrize("P", [0, 3])
def test_between_blocks_hook_runs_at_every_block_boundary_and_changes_nothing(tiny_vit, images, P):
    """The serving scheduler's preemption point: called depth - 1 times; other work run inside it
    (here: another forward pass) leaves this batch's result bit-identical."""
    D, L = tiny_vit.cfg.embed_dim, tiny_vit.cfg.depth
    prompts = PromptBatch.single_task(torch.randn(L, P, D), images.shape[0], deep=True) if P else None
    calls = []

    def other_work() -> None:
        calls.append(tiny_vit.forward_features(images[:2]))

    with torch.inference_mode():
        plain = tiny_vit.forward_features(images, prompts)
        hooked = tiny_vit.forward_features(images, prompts, between_blocks=other_work)
    assert len(calls) == L - 1
    assert torch.equal(plain, hooked)


# --- deep prompts as keys/values (PromptKV: VisionTransformer.forward_features's `kv`) -------------


def kv_table(model: VisionTransformer, tasks: list[torch.Tensor]) -> torch.Tensor:
    """Deep tasks' prompts (L, P_s, D) → a keys/values table (S, L, Pmax, 2D), zero-padded."""
    cfg = model.cfg
    P = max(p.shape[1] for p in tasks)
    table = torch.zeros(len(tasks), cfg.depth, P, 2 * cfg.embed_dim, dtype=model.pos_embed.dtype)
    with torch.no_grad():
        for s, p in enumerate(tasks):
            table[s, :, : p.shape[1]] = model.prompt_kv(p)
    return table


@pytest.fixture(params=["vit_test_tiny", "vit_test_small"])
def vit(request) -> VisionTransformer:
    """Depth 2 and 4: layer 0, the middle layers and the last one each get their own keys/values."""
    from vpt import get_preset

    model = VisionTransformer(get_preset(request.param)).init_random(torch.Generator().manual_seed(0))
    return model.eval().requires_grad_(False)


def test_prompt_kv_are_each_layers_keys_and_values(vit):
    """Layer i's entry is what its qkv projection gives LN1_i(prompts[i]) at the key and value rows, in
    layout of qkv's output (per token: keys, then values)."""
    cfg = vit.cfg
    prompts = torch.randn(cfg.depth, 5, cfg.embed_dim, generator=torch.Generator().manual_seed(0))
    kv = vit.prompt_kv(prompts)
    assert kv.shape == (cfg.depth, 5, 2 * cfg.embed_dim)
    D = cfg.embed_dim
    for i, blk in enumerate(vit.blocks):
        qkv = blk.attn.qkv(blk.norm1(prompts[i]))  # (5, 3D): q, k, v per token
        assert rel_err(kv[i, :, :D], qkv[:, D : 2 * D]) <= TOL  # keys
        assert rel_err(kv[i, :, D:], qkv[:, 2 * D :]) <= TOL  # values
    with pytest.raises(ValueError, match="layers"):
        vit.prompt_kv(prompts[:1])


@pytest.mark.parametrize("lengths", [[6, 6, 6, 6], [6, 2, 0, 4], [0, 0, 0, 0]])
def test_kv_path_equals_the_token_path_at_every_kept_position(vit, lengths):
    """VPT-deep with prompts as keys/values gives CLS and every patch token exactly what the full
    forward (prompts as tokens, replaced before each layer) gives them — uniform, ragged (masked) and
    prompt-free batches, each sample against the official algorithm run on it alone."""
    cfg = vit.cfg
    g = torch.Generator().manual_seed(len(set(lengths)))
    tasks = [torch.rand(cfg.depth, n, cfg.embed_dim, generator=g) * 0.2 - 0.1 for n in lengths]
    table = kv_table(vit, tasks) if max(lengths) else torch.zeros(4, cfg.depth, 1, 2 * cfg.embed_dim)
    images = torch.randn(4, 3, 32, 32, generator=g)
    kv = PromptKV.build(table, torch.arange(4), lengths)
    assert kv.uniform == (len(set(lengths)) == 1)
    with torch.inference_mode():
        got = vit.forward_features(images, None, kv=kv)  # (B, 1 + N, D)
        for b, p in enumerate(tasks):
            full = vit.forward_features(images[b : b + 1], PromptBatch.single_task(p, 1, deep=True))
            P = p.shape[1]
            kept = torch.cat([full[:, :1], full[:, 1 + P :]], dim=1)  # CLS + patches
            assert rel_err(got[b : b + 1], kept) <= TOL, (b, lengths)
            assert rel_err(got[b, :1], reference_features(vit, images[b : b + 1], p, deep=True)) <= TOL


def test_one_forward_mixes_shallow_tokens_and_deep_keys_values(vit):
    """Shallow samples' prompts as tokens and deep samples' as keys/values in one forward (each masked
    where a sample has none): every sample's CLS feature is the official algorithm's on it alone."""
    cfg = vit.cfg
    g = torch.Generator().manual_seed(4)
    D, L = cfg.embed_dim, cfg.depth
    shallow = [torch.rand(1, n, D, generator=g) * 0.2 - 0.1 for n in (6, 2)]
    deep = [torch.rand(L, n, D, generator=g) * 0.2 - 0.1 for n in (3, 7)]
    tokens = torch.zeros(4, 1, 7, D)
    tokens[0, :, :6], tokens[1, :, :2] = shallow
    kv = kv_table(
        vit, [shallow[0][:1].expand(L, -1, -1)[:, :0], shallow[1][:1].expand(L, -1, -1)[:, :0], *deep]
    )
    slots = torch.tensor([0, 2, 1, 3, 2, 0])
    tok_len, kv_len = [6, 0, 2, 0, 0, 6], [0, 3, 0, 7, 3, 0]
    images = torch.randn(len(slots), 3, 32, 32, generator=g)
    prompts = PromptBatch.build(tokens, slots, tok_len, [False] * len(slots))
    with torch.inference_mode():
        got = vit.pool(vit.forward_features(images, prompts, kv=PromptKV.build(kv, slots, kv_len)))
        for b, s in enumerate(slots.tolist()):
            task, is_deep = (deep[s - 2], True) if s >= 2 else (shallow[s], False)
            want = reference_features(vit, images[b : b + 1], task, is_deep)
            assert rel_err(got[b : b + 1], want) <= TOL, b


def test_kv_path_masks_only_ragged_batches(tiny_vit, images):
    """Uniform prompt lengths: SDPA without a mask (fused kernels); ragged ones: masked."""
    L = tiny_vit.cfg.depth
    tasks = [torch.randn(L, n, tiny_vit.cfg.embed_dim) for n in (3, 3, 1)]
    table = kv_table(tiny_vit, tasks)
    uniform = PromptKV.build(table, torch.tensor([0, 1, 0, 1, 0, 1]), [3] * 6)
    ragged = PromptKV.build(table, torch.tensor([0, 2, 0, 1, 2, 1]), [3, 1, 3, 3, 1, 3])
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("attn_mask") is not None)
        return sdpa(*args, **kwargs)

    with mock.patch.object(F, "scaled_dot_product_attention", spy), torch.inference_mode():
        tiny_vit.forward_features(images, kv=uniform)
        tiny_vit.forward_features(images, kv=ragged)
    assert seen == [False] * L + [True] * L


def test_kv_path_in_bf16_follows_fp32(tiny_vit, images):
    """The GPU dtype: keys/values derived and attended in bf16, within bf16's rounding of the fp32
    token path (the tolerance of test_half_precision_mixed_batch_follows_fp32)."""
    L, D = tiny_vit.cfg.depth, tiny_vit.cfg.embed_dim
    g = torch.Generator().manual_seed(9)
    tasks = [torch.rand(L, n, D, generator=g) * 0.2 - 0.1 for n in (5, 2, 5)]
    slots, lengths = torch.tensor([0, 1, 2, 1, 0, 2]), [5, 2, 5, 2, 5, 5]
    half = copy.deepcopy(tiny_vit).to(torch.bfloat16)
    with torch.inference_mode():
        got = half.pool(
            half.forward_features(images.bfloat16(), kv=PromptKV.build(kv_table(half, tasks), slots, lengths))
        )
        for b, s in enumerate(slots.tolist()):
            want = reference_features(tiny_vit, images[b : b + 1], tasks[s], deep=True)
            assert rel_err(got[b : b + 1].float(), want) <= 3e-2


@pytest.mark.parametrize("P", [0, 3])
def test_between_blocks_hook_on_the_kv_path(tiny_vit, images, P):
    L, D = tiny_vit.cfg.depth, tiny_vit.cfg.embed_dim
    table = kv_table(tiny_vit, [torch.randn(L, max(P, 1), D)])
    kv = PromptKV.build(table, torch.zeros(images.shape[0], dtype=torch.long), [P] * images.shape[0])
    calls = []
    with torch.inference_mode():
        plain = tiny_vit.forward_features(images, kv=kv)
        hooked = tiny_vit.forward_features(
            images, kv=kv, between_blocks=lambda: calls.append(tiny_vit.forward_features(images[:2]))
        )
    assert len(calls) == L - 1 and torch.equal(plain, hooked)


def test_kv_prompt_length_over_table_is_refused(tiny_vit):
    table = torch.zeros(1, tiny_vit.cfg.depth, 3, 2 * tiny_vit.cfg.embed_dim)
    with pytest.raises(ValueError, match="exceeds"):
        PromptKV.build(table, torch.tensor([0]), [4])


@pytest.mark.parametrize("how", ["plain", "tokens", "keys_values", "mixed_ragged"])
def test_cls_only_last_block_gives_the_full_forwards_cls(vit, how):
    """`cls_only`: the last block computes CLS alone — the one position the head reads — and gets the
    full forward's numbers there, with prompts as tokens, as keys/values, or both (masked, ragged)."""
    cfg = vit.cfg
    g = torch.Generator().manual_seed(11)
    D, L = cfg.embed_dim, cfg.depth
    images = torch.randn(4, 3, 32, 32, generator=g)
    slots = torch.tensor([0, 1, 1, 0])
    prompts = kv = None
    if how in ("tokens", "mixed_ragged"):
        table = torch.rand(2, L, 5, D, generator=g) * 0.2 - 0.1
        lengths = [5, 2, 2, 5] if how == "tokens" else [5, 0, 0, 5]
        prompts = PromptBatch.build(table, slots, lengths, [how == "tokens"] * 4)
    if how in ("keys_values", "mixed_ragged"):
        deep = [torch.rand(L, n, D, generator=g) * 0.2 - 0.1 for n in (4, 3)]
        kv = PromptKV.build(
            kv_table(vit, deep), slots, [4, 3, 3, 4] if how == "keys_values" else [0, 3, 3, 0]
        )
    with torch.inference_mode():
        full = vit.forward_features(images, prompts, kv=kv)
        cls = vit.forward_features(images, prompts, kv=kv, cls_only=True)
    assert cls.shape == (4, 1, D)
    assert rel_err(cls, full[:, :1]) <= TOL
