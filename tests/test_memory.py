"""The memory planner: what fits is chosen and said, what cannot fit is refused in one line, before loading."""

import pytest
import torch

from lav2 import memory
from lav2.checkpoint import DEFAULT_CLIP, clip_params
from lav2.errors import Lav2Error
from lav2.model import Config

CPU = torch.device("cpu")
SEVEN_B = Config.from_name("paper-7b")
CLIP_L = clip_params(DEFAULT_CLIP)


def plan(gib: float, monkeypatch, **asked):
    monkeypatch.setenv("LAV2_MEMORY_GIB", str(gib))
    return memory.plan_inference(SEVEN_B, CPU, dtype=asked.get("dtype"), quantize=asked.get("quantize"),
                                 clip_params=CLIP_L, default_dtype=torch.float32)


def test_weights_of_a_7b_are_counted_from_the_config():
    need = {d: memory.inference_bytes(SEVEN_B, dtype=d, quantize=None, clip_params=CLIP_L) / 2**30
            for d in (torch.float32, torch.bfloat16)}
    # 6.74 B LLaMA parameters + 0.06 B adapter + 0.3 B CLIP: 28.4 GB in float32, half that in bfloat16
    assert 27 < need[torch.float32] < 34 and 13.5 < need[torch.bfloat16] < 17.5
    int8 = memory.inference_bytes(SEVEN_B, dtype=torch.float32, quantize="int8", clip_params=CLIP_L) / 2**30
    assert 7 < int8 < 11


def test_the_default_dtype_when_it_fits(monkeypatch):
    chosen = plan(64, monkeypatch)
    assert chosen.dtype == torch.float32 and chosen.quantize is None and chosen.note is None


@pytest.mark.parametrize("gib, dtype, quantize, words", [
    (24, torch.bfloat16, None, "loading in bfloat16"),
    (12, torch.float32, "int8", "loading in int8"),
])
def test_a_smaller_setting_is_chosen_and_said_in_one_line(monkeypatch, gib, dtype, quantize, words):
    chosen = plan(gib, monkeypatch)
    assert (chosen.dtype, chosen.quantize) == (dtype, quantize)
    assert "\n" not in chosen.note and words in chosen.note and "float32 needs about" in chosen.note
    assert chosen.need <= chosen.have


def test_nothing_fits_is_refused_naming_the_need_and_the_memory(monkeypatch):
    with pytest.raises(Lav2Error, match=r"even int8 needs about \d+\.\d GiB and the CPU has 4\.0 GiB available"):
        plan(4, monkeypatch)


def test_an_asked_setting_that_does_not_fit_is_refused_with_what_would(monkeypatch):
    with pytest.raises(Lav2Error, match=r"float32 needs about .* GiB available; use --dtype bfloat16 or --quantize int8"):
        plan(20, monkeypatch, dtype=torch.float32)
    assert plan(20, monkeypatch, dtype=torch.bfloat16).note is None  # asked and fits: no note


def test_training_the_7b_recipe_on_24_gib_is_refused_without_checkpointing_naming_what_fits(monkeypatch):
    monkeypatch.setenv("LAV2_MEMORY_GIB", "24")
    kwargs = dict(dtype=torch.bfloat16, micro_batch=4, seq_len=512, clip_params=CLIP_L, where="recipe.yaml")
    assert memory.check_training(SEVEN_B, CPU, load_in_8bit=True, checkpointing=True, **kwargs) < 12 * 2**30
    with pytest.raises(Lav2Error, match=r"recipe.yaml: not enough memory to train: about \d+\.\d GiB needed and the "
                                        r"CPU has 24\.0 GiB available; set train\.load_in_8bit: \w+, "
                                        r"train\.gradient_checkpointing: true \(\d+\.\d GiB\)"):
        memory.check_training(SEVEN_B, CPU, load_in_8bit=False, checkpointing=False, **kwargs)


def test_chat_refuses_a_model_the_machine_cannot_hold_in_one_line(tiny_official, monkeypatch):
    from click.testing import CliRunner

    from lav2.cli import main

    monkeypatch.setenv("LAV2_MEMORY_GIB", "0.1")
    result = CliRunner().invoke(main, ["chat", "--model", str(tiny_official[1]), "--prompt", "hi"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "not enough memory" in lines[0] and "0.1 GiB available" in lines[0]
