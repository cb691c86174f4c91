"""The model as the specification: base equivalence at zero init, what trains, counts, caches, folding."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import random_llama
from lav2.model import (Config, LLaMAAdapter, PRESETS, adapter_state_dict, apply_rotary_emb, count_params,
                        fold_adapters_, mark_trainable, param_groups, precompute_freqs_cis)

ADAPTER_LAYOUTS = ["tiny-paper", "tiny-official", "tiny-official-lora"]


def tiny_clip():
    import open_clip

    from conftest import TINY_CLIP

    torch.manual_seed(5)
    return open_clip.CLIP(**TINY_CLIP).visual.eval()


def with_base_of(layout: str, base: LLaMAAdapter, seed: int = 3) -> LLaMAAdapter:
    """A freshly initialised adapter model (zero-init gates, zero biases, unit scales) over `base`'s weights."""
    torch.manual_seed(seed)
    model = LLaMAAdapter(Config.from_name(layout))
    model.load_state_dict(base.state_dict(), strict=False)
    if model.visual is not None:
        model.visual.clip = tiny_clip()
    return model.eval()


@pytest.fixture(scope="module")
def base():
    return random_llama(Config.from_name("tiny")).eval()


def test_rope_matches_meta_complex_form():
    x = torch.randn(2, 5, 3, 8)
    freqs = precompute_freqs_cis(8, 16, 10000.0)[:5]
    angles = 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)
    cis = torch.polar(torch.ones(5, 4), torch.outer(torch.arange(5).float(), angles))
    reference = torch.view_as_real(torch.view_as_complex(x.reshape(2, 5, 3, 4, 2)) * cis[None, :, None]).flatten(3)
    torch.testing.assert_close(apply_rotary_emb(x, freqs), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", ADAPTER_LAYOUTS)
def test_zero_init_adapter_equals_base(base, layout):
    model = with_base_of(layout, base)
    tokens = torch.randint(0, 300, (2, 11))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = base(tokens)
        assert (model(tokens) - expected).abs().max() <= 1e-6
        assert (model(tokens, images) - expected).abs().max() <= 1e-6


def train_steps(model: LLaMAAdapter, steps: int) -> tuple[set[str], set[str]]:
    """(trainable tensors that did not change, other tensors that did) after `steps` AdamW steps."""
    model.train()
    mark_trainable(model)
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for g in param_groups(model).values() for n, _ in g}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    torch.manual_seed(0)
    for _ in range(steps):
        tokens = torch.randint(0, 300, (2, 9))
        logits = model(tokens, torch.randn(2, 3, 32, 32))
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    unchanged = {n for n in trainable if torch.equal(before[n], after[n])}
    moved = {n for n in before if n not in trainable and not torch.equal(before[n], after[n])}
    return unchanged, moved


@pytest.mark.parametrize("layout", ADAPTER_LAYOUTS)
def test_every_trainable_tensor_changes_after_one_step(base, layout):
    model = random_llama(Config.from_name(layout), seed=7)  # adapters away from zero: every path carries gradient
    model.load_state_dict(base.state_dict(), strict=False)
    model.visual.clip = tiny_clip()
    unchanged, moved = train_steps(model, steps=1)
    assert unchanged == set() and moved == set()


@pytest.mark.parametrize("layout", ADAPTER_LAYOUTS)
def test_from_zero_init_the_gates_open_first_then_everything_trains(base, layout):
    # tanh(0) = 0 blocks the prompts' gradient on the first step; LoRA's zero B blocks A's
    unchanged, moved = train_steps(with_base_of(layout, base), steps=1)
    assert moved == set()
    assert not any(n.endswith(".gate") for n in unchanged)
    assert all(n == "adapter_query" or n.startswith("visual.") or n.endswith((".lora_a", "new_gate")) for n in unchanged)
    unchanged, moved = train_steps(with_base_of(layout, base), steps=2)
    assert unchanged == set() and moved == set()


@pytest.mark.parametrize("layout", ADAPTER_LAYOUTS)
def test_param_groups_are_disjoint_and_hold_no_base_or_clip(base, layout):
    model = with_base_of(layout, base)
    groups = {g: {n for n, _ in params} for g, params in param_groups(model).items()}
    assert groups["visual"] and groups["language"]
    assert not groups["visual"] & groups["language"]
    everything = groups["visual"] | groups["language"]
    assert not any(n.startswith("visual.clip.") or n.endswith(("wq.weight", "w1.weight")) for n in everything)
    assert "tok_embeddings.weight" not in everything and "output.weight" not in everything


def test_paper_layout_puts_visual_prompts_only_in_the_first_layers():
    config = Config.from_name("paper-7b")
    kinds = config.prompt_layers()
    assert [i for i, k in kinds.items() if k == "visual"] == [0]
    assert sorted(i for i, k in kinds.items() if k == "adapter") == list(range(2, 32))


def test_parameter_counts_on_meta_device():
    counts = {}
    for name in ("llama-7b", "official-bias-7b", "paper-7b"):
        with torch.device("meta"):
            counts[name] = count_params(LLaMAAdapter(Config.from_name(name)))
    print(counts)
    assert counts["llama-7b"]["base"] == 6_738_415_616
    assert counts["official-bias-7b"]["base"] == 6_738_415_616
    # the released BIAS-7B file: 363 tensors, 63,095,552 parameters
    assert counts["official-bias-7b"]["adapter_tensors"] == 363
    assert counts["official-bias-7b"]["adapter"] == 63_095_552
    assert counts["paper-7b"]["adapter"] == 64_676_608


@pytest.mark.parametrize("layout", ADAPTER_LAYOUTS)
def test_kv_cache_decoding_matches_full_forward(base, layout):
    model = random_llama(Config.from_name(layout), seed=4).eval()
    model.load_state_dict(base.state_dict(), strict=False)
    model.visual.clip = tiny_clip()
    tokens, images = torch.randint(0, 300, (2, 12)), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model(tokens, images)
        model.setup_cache(2, 32)
        steps = [model(tokens[:, :7], images, start_pos=0)]
        steps += [model(tokens[:, t:t + 1], start_pos=t) for t in range(7, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_image_mask_removes_the_visual_prompt(base):
    model = random_llama(Config.from_name("tiny-paper"), seed=4).eval()
    model.visual.clip = tiny_clip()
    tokens, images = torch.randint(0, 300, (2, 6)), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        masked = model(tokens, images, image_mask=torch.tensor([True, False]))
        torch.testing.assert_close(masked[1], model(tokens[1:])[0], rtol=0, atol=1e-6)
        assert (masked[0] - model(tokens[:1])[0]).abs().max() > 1e-4


@pytest.mark.parametrize("layout", ["tiny-paper", "tiny-official-lora"])
def test_fold_bias_scale_lora_keeps_logits(base, layout):
    model = random_llama(Config.from_name(layout), seed=6).eval()
    model.visual.clip = tiny_clip()
    folded = copy.deepcopy(model)
    fold_adapters_(folded)
    left = [n for n in adapter_state_dict(folded) if n.endswith((".scale", ".lora_a", ".lora_b"))]
    # LoRA on wk/wv stays: the prompts are projected by the bare W
    assert all(n.split(".")[-2] in ("wk", "wv") and ".lora_" in n for n in left)
    assert bool(left) == (model.config.lora_rank > 0)
    tokens, images = torch.randint(0, 300, (2, 9)), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(tokens, images), model(tokens, images), rtol=0, atol=1e-5)


def cached_decode(model: LLaMAAdapter, tokens: torch.Tensor, images: torch.Tensor, step=None) -> torch.Tensor:
    """Logits of a prefill of 5 tokens then one token at a time through the KV cache, each token through `step`
    (the model itself, or e.g. torch.compile of it)."""
    step = model if step is None else step
    with torch.no_grad():
        model.setup_cache(tokens.shape[0], 16)
        steps = [model(tokens[:, :5], images, start_pos=0)]
        steps += [step(tokens[:, t:t + 1], start_pos=t) for t in range(5, tokens.shape[1])]
        model.clear_cache()
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("layout", ADAPTER_LAYOUTS)
def test_left_padded_rows_compute_what_each_row_computes_alone(layout):
    # pad: each row counts positions from its first real token and nobody attends to the padding, so a batch of
    # prompts of different lengths gives every row its own logits (RoPE would otherwise move the prompt scores)
    model = random_llama(Config.from_name(layout), seed=4).eval()
    model.visual.clip = tiny_clip()
    rows = [torch.randint(3, 300, (n,)) for n in (7, 3, 5)]
    images, with_image = torch.randn(3, 3, 32, 32), torch.tensor([True, False, True])
    pad = torch.tensor([7 - len(r) for r in rows])
    tokens = torch.stack([F.pad(r, (7 - len(r), 0)) for r in rows])
    nexts = torch.randint(3, 300, (3, 2))
    with torch.no_grad():
        model.setup_cache(3, 16)
        batched = [model(tokens, images, image_mask=with_image, start_pos=0, pad=pad)[:, -1]]
        batched += [model(nexts[:, i:i + 1], start_pos=7 + i, pad=pad)[:, -1] for i in range(2)]
        for row, r in enumerate(rows):
            model.setup_cache(1, 16)
            alone = [model(r[None], images[row:row + 1] if with_image[row] else None, start_pos=0)[0, -1]]
            alone += [model(nexts[row:row + 1, i:i + 1], start_pos=len(r) + i)[0, -1] for i in range(2)]
            for step, logits in enumerate(alone):
                torch.testing.assert_close(batched[step][row], logits, rtol=0, atol=2e-5)
        model.clear_cache()


def test_config_round_trip_and_bad_configs():
    for name in PRESETS:
        config = Config.from_name(name)
        assert Config.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="fusion"):
        Config.from_name("tiny", fusion="late")
    with pytest.raises(ValueError, match="unknown linear"):
        Config.from_name("tiny", bias_targets=("wz",))
    with pytest.raises(ValueError, match="unknown config keys: colour"):
        Config.from_dict({**Config().to_dict(), "colour": 1})
    with pytest.raises(KeyError, match="unknown model preset"):
        Config.from_name("70b")


def test_kv_cache_refuses_gradients_and_positions_beyond_it(base):
    base.setup_cache(1, 8)
    try:
        with pytest.raises(RuntimeError, match="without gradients"):
            base(torch.zeros(1, 1, dtype=torch.long), start_pos=0)
        with torch.no_grad(), pytest.raises(ValueError, match=r"positions 6\.\.8 do not fit the KV cache \(8"):
            base(torch.zeros(1, 3, dtype=torch.long), start_pos=6)
    finally:
        base.clear_cache()
