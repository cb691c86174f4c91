"""Storage and kernel swaps applied at load time change speed and memory, never what the model computes."""

import copy
import gc
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import random_llama
from lav2.fastpath import (Int8Head, Int8Linear, store_for_decoding_, empty_on_huge_pages, quantize_int8_,
                           single_query_attention)
from lav2.generate import compiled_step
from lav2.model import EXTRAS, AdapterLinear, Config, adapter_state_dict, fold_adapters_
from test_model import cached_decode, tiny_clip


@pytest.mark.parametrize("heads, kv_heads, cached", [(4, 4, 1), (4, 4, 37), (8, 2, 300)])
def test_single_query_attention_equals_sdpa(heads, kv_heads, cached):
    torch.manual_seed(0)
    q = torch.randn(2, heads, 1, 16)
    k, v = torch.randn(2, 2, kv_heads, cached, 16).unbind(1)
    shared = heads // kv_heads
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(shared, 1), v.repeat_interleave(shared, 1))
    torch.testing.assert_close(single_query_attention(q, k, v), expected, rtol=0, atol=1e-6)
    # with a padding mask (batched decoding): the masked positions get no weight
    mask = torch.ones(2, 1, 1, cached, dtype=torch.bool)
    mask[1, ..., : cached // 2] = False
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(shared, 1), v.repeat_interleave(shared, 1),
                                              attn_mask=mask)
    torch.testing.assert_close(single_query_attention(q, k, v, mask), expected, rtol=0, atol=1e-6)


def test_compiled_decode_step_equals_eager_with_grouped_query_attention():
    # compiled, a decode step attends through single_query_attention (over the cache and the prompts); eagerly, SDPA
    model = random_llama(Config.from_name("tiny-paper", n_kv_heads=2), seed=8).eval()
    model.visual.clip = tiny_clip()
    tokens, images = torch.randint(0, 300, (1, 12)), torch.randn(1, 3, 32, 32)
    eager = cached_decode(model, tokens, images)
    compiled = copy.deepcopy(model)
    step = compiled_step(compiled)
    assert all(layer.attention.attend is single_query_attention for layer in compiled.layers)
    torch.testing.assert_close(cached_decode(compiled, tokens, images, step=lambda t, start_pos: compiled_logits(
        step, compiled, t, start_pos)), eager, rtol=0, atol=1e-5)


def compiled_logits(step, model, token, pos):
    return step(model, token, pos)[:, None]  # (B, V) -> (B, 1, V), as the model's own output


def mapping_of(address: int) -> tuple[int, int] | None:
    """The (start, end) of this process's memory mapping that holds `address`, from /proc/self/maps."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        start, end = (int(a, 16) for a in line.split()[0].split("-"))
        if start <= address < end:
            return start, end
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages are a Linux madvise")
def test_huge_page_matrix_lives_in_its_own_mapping_until_its_last_view_goes():
    stored = empty_on_huge_pages(512, 1024)  # 2 MiB
    stored.fill_(3.0)
    address = stored.data_ptr()
    mapping = mapping_of(address)
    assert mapping is not None
    view = stored[1:3].t()
    del stored
    gc.collect()
    assert view.sum().item() == 3.0 * 2 * 1024  # the memory stays while a view of it lives
    del view
    gc.collect()
    assert mapping_of(address) != mapping  # and is unmapped with the last view


@pytest.mark.parametrize("layout", ["tiny-paper", "tiny-official-lora"])
def test_store_for_decoding_changes_storage_only_and_survives_fold_and_copy(layout):
    model = random_llama(Config.from_name(layout), seed=7).eval()
    model.visual.clip = tiny_clip()
    laid = store_for_decoding_(copy.deepcopy(model))
    wk = laid.layers[1].attention.wk.weight
    assert not wk.is_contiguous() and wk.t().is_contiguous()  # stored (in, out)-contiguous
    before, after = model.state_dict(), laid.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    tokens, images = torch.randint(0, 300, (2, 9)), torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(cached_decode(laid, tokens, images), cached_decode(model, tokens, images),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(cached_decode(copy.deepcopy(laid), tokens, images),
                               cached_decode(model, tokens, images), rtol=0, atol=1e-5)
    # folding writes into the laid-out weight in place
    folded = copy.deepcopy(model)
    fold_adapters_(folded)
    fold_adapters_(laid)
    assert laid.layers[1].attention.wk.weight.t().is_contiguous()
    torch.testing.assert_close(cached_decode(laid, tokens, images), cached_decode(folded, tokens, images),
                               rtol=0, atol=1e-5)


def test_int8_swap_keeps_one_owner_of_each_extra_and_stays_close():
    model = random_llama(Config.from_name("tiny-paper"), seed=9).eval()
    model.visual.clip = tiny_clip()
    extras = {name: getattr(m, p) for name, m in model.named_modules() if type(m) is AdapterLinear
              for p in EXTRAS if getattr(m, p) is not None}
    adapter = adapter_state_dict(model)
    tokens, images = torch.randint(0, 300, (2, 9)), torch.randn(2, 3, 32, 32)
    reference = cached_decode(model, tokens, images)
    quantized = quantize_int8_(copy.deepcopy(model))
    quantize_int8_(model)  # in place: the float W goes, the extras stay the same tensors
    assert all(isinstance(m, Int8Linear) for m in model.modules() if isinstance(m, AdapterLinear))
    assert isinstance(model.output, Int8Head)
    swapped = {name: getattr(m, p) for name, m in model.named_modules() if isinstance(m, Int8Linear)
               for p in EXTRAS if getattr(m, p) is not None}
    assert swapped.keys() == extras.keys() and all(swapped[k] is extras[k] for k in extras)
    assert adapter_state_dict(model).keys() == adapter.keys()  # int8 matrices and scales are base, not adapter
    assert not any(p.dtype == torch.float32 and p.ndim == 2 and p.shape[0] >= 64 for n, p in model.named_parameters()
                   if not n.startswith(("visual.", "tok_embeddings")))
    out = cached_decode(model, tokens, images)
    torch.testing.assert_close(out, cached_decode(quantized, tokens, images), rtol=0, atol=0)
    assert (out - reference).abs().max() < 0.05 * reference.abs().max()
    with pytest.raises(Exception, match="cannot fold into a quantized weight"):
        fold_adapters_(model)


def test_compiled_int8_row_is_the_exact_dequantized_product_and_decodes_like_eager_int8():
    from lav2.fastpath import FUSED_MAX_IN, int8_matmul, quantize_rows

    torch.manual_seed(0)
    weight, scales = quantize_rows(torch.randn(96, 64))
    x = torch.randn(1, 1, 64)
    compiled = torch.compile(lambda x: int8_matmul(x, weight, scales), fullgraph=True)(x)
    exact = x.double() @ (weight.double() * scales.double()[:, None]).t()  # no bfloat16 rounding of x
    assert compiled.shape == (1, 1, 96) and weight.shape[1] <= FUSED_MAX_IN
    torch.testing.assert_close(compiled.double(), exact, rtol=0, atol=1e-5)
    assert (int8_matmul(x, weight, scales).double() - exact).abs().max() > 1e-4  # the eager kernel's bfloat16

    # a whole model: compiled int8 decoding gives the eager int8 model's greedy tokens
    model = quantize_int8_(random_llama(Config.from_name("tiny-paper"), seed=9).eval())
    model.visual.clip = tiny_clip()
    tokens, images = torch.randint(0, 300, (1, 12)), torch.randn(1, 3, 32, 32)
    eager = cached_decode(model, tokens, images)
    step = compiled_step(model)
    fused = cached_decode(model, tokens, images, step=lambda t, start_pos: compiled_logits(step, model, t, start_pos))
    assert torch.equal(fused[0, 4:].argmax(-1), eager[0, 4:].argmax(-1))
    assert (fused - eager).abs().max() < 0.02 * eager.abs().max()


def test_int8_kernel_takes_inputs_that_are_not_64_byte_aligned():
    # tensors read from a safetensors file live at the file's offsets: torch's int8 kernel crashed on them
    from lav2.fastpath import int8_matmul, quantize_rows

    weight, scales = quantize_rows(torch.randn(64, 64).to(torch.bfloat16))
    buffer = torch.randn(4 * 64 + 8).to(torch.bfloat16)
    x = buffer[8:].view(4, 64)  # 16 bytes past an aligned start
    assert x.data_ptr() % 64
    torch.testing.assert_close(int8_matmul(x, weight, scales), int8_matmul(x.clone(), weight, scales), rtol=0, atol=0)
