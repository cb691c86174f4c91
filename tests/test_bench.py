"""`python -m lav2.bench`: each benchmark runs at tiny size and prints one JSON object with the documented keys.
No timing is asserted: these machines are shared and slow."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

MACHINE_KEYS = {"device", "name", "threads", "torch"}
DECODE_KEYS = {"benchmark", "config", "dtype", "image", "compile", "params", "time_to_first_token_s",
               "tokens_per_s", "per_token_ms", "bytes_per_token", "bytes_breakdown", "bandwidth_gb_s",
               "bound_tokens_per_s", "achieved_tokens_per_s", "ratio", "machine"}
TRAIN_KEYS = {"benchmark", "config", "seq_len", "batch_size", "gradient_checkpointing", "load_in_8bit",
              "tokens_per_s", "step_s", "forward_s", "backward_s", "optimizer_s", "share", "peak_memory_bytes",
              "peak_memory_gib", "memory_method", "trainable_params", "machine"}
MEMORY_KEYS = {"benchmark", "estimate", "seq_len", "micro_batch_size", "load_in_8bit", "gradient_checkpointing",
               "steps", "step_s", "peak_memory_bytes", "peak_memory_gib", "memory_method", "planner_estimate_gib",
               "machine"}
CHAT_KEYS = {"benchmark", "dtype", "quantize", "time_to_first_token_s", "tokens_per_s", "peak_memory_bytes",
             "load_s", "machine"}


def bench(*args: str) -> dict:
    """Run the benchmark as a user does; stdout must be exactly one JSON object."""
    done = subprocess.run([sys.executable, "-m", "lav2.bench", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_decode_float32_reports_the_bound_and_the_plain_llama():
    result = bench("decode", "--config", "tiny", "--new-tokens", "4", "--prompt-tokens", "8",
                   "--bandwidth-mib", "16")
    assert DECODE_KEYS <= set(result) and MACHINE_KEYS <= set(result["machine"])
    assert set(result["per_token_ms"]) == {"adapter", "base", "merged"}
    assert {"adapter_overhead", "merged_overhead"} <= set(result)
    assert result["bound_tokens_per_s"] > 0 and result["ratio"] > 0


def test_decode_compares_the_bfloat16_prefill_with_the_float32_one():
    if not torch.cpu._is_avx512_bf16_supported():
        pytest.skip("no bfloat16 matmul instructions: the prefill runs as stored, nothing to compare")
    result = bench("decode", "--config", "tiny", "--new-tokens", "4", "--prompt-tokens", "16", "--bandwidth-mib", "16",
                   "--no-compare")
    prefill = result["prefill"]
    assert prefill["dtype"] == "bfloat16" and set(prefill["time_to_first_token_s"]) == {"fast", "stored"}
    assert prefill["time_to_first_token_s"]["fast"] == result["time_to_first_token_s"]
    assert 0 <= prefill["greedy_agreement"] <= 1 and prefill["first_token_max_logit_error"] >= 0


def test_decode_int8_with_image_compares_with_float32():
    result = bench("decode", "--config", "tiny", "--dtype", "int8", "--image", "--new-tokens", "6",
                   "--prompt-tokens", "8", "--bandwidth-mib", "16")
    assert DECODE_KEYS | {"greedy_agreement", "first_disagreement", "max_logit_error", "speedup_vs_float32"} <= set(result)
    assert set(result["per_token_ms"]) == {"float32", "adapter"}
    assert 0 <= result["greedy_agreement"] <= 1


def test_compiled_int8_decode_also_times_torchs_int8_kernel_on_the_same_tokens():
    result = bench("--threads", "1", "decode", "--config", "tiny", "--dtype", "int8", "--compile", "--new-tokens", "4",
                   "--prompt-tokens", "8", "--rounds", "1", "--bandwidth-mib", "16")
    assert set(result["per_token_ms"]) == {"float32", "adapter", "torch_int8_kernel"}
    other = result["torch_int8_kernel"]
    assert other["fused_row_speedup"] > 0 and 0 <= other["greedy_agreement"] <= 1 and other["max_logit_error"] > 0


def test_train_reports_phases_and_peak_memory_in_a_table_or_json():
    flags = ["train", "--config", "tiny", "--seq-len", "16", "--batch-size", "2", "--steps", "1", "--checkpointing",
             "--8bit"]
    result = bench(*flags)
    assert TRAIN_KEYS <= set(result)
    assert set(result["share"]) == {"forward", "backward", "optimizer"}
    assert result["gradient_checkpointing"] and result["load_in_8bit"]
    assert result["peak_memory_bytes"] > 0
    done = subprocess.run([sys.executable, "-m", "lav2.bench", *flags, "--table"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "tokens_per_s" in done.stdout and not done.stdout.lstrip().startswith("{")


def test_train_on_the_alpaca_length_mix_reports_supervised_tokens_and_padding_both_ways():
    result = bench("--threads", "1", "train", "--config", "tiny", "--length-mix", "alpaca", "--batch-size", "4",
                   "--steps", "2", "--records", "100")
    assert result["length_mix"] == "alpaca" and result["max_length"] <= 256 and MACHINE_KEYS <= set(result["machine"])
    for setting in ("grouped", "shuffled"):
        assert result[setting]["supervised_tokens_per_s"] > 0 and 0 <= result[setting]["padding_fraction"] < 1
    assert result["grouped"]["padding_fraction"] < result["shuffled"]["padding_fraction"]


def test_memory_7b_measures_real_steps_of_the_recipe():
    result = bench("memory-7b", "--config", "tiny", "--seq-len", "16", "--micro-batch-size", "2", "--steps", "1")
    assert MEMORY_KEYS <= set(result) and result["estimate"] is False
    assert len(result["step_s"]) == 1 and result["peak_memory_bytes"] > 0 and result["planner_estimate_gib"] > 0


def test_import_runs_lav2_download_on_a_hugging_face_folder_and_reports_its_peak():
    result = bench("import", "--config", "tiny")
    assert result["import_s"] > 0 and result["peak_memory_bytes"] > 0
    assert result["written_bytes"] > result["source_bytes"] > 0  # the base, and the CLIP's vision tower


def test_the_gpu_script_runs_at_tiny_size_on_the_cpu():
    result = bench("--threads", "1", "gpu", "--config", "tiny", "--device", "cpu", "--steps", "1",
                   "--new-tokens", "3")
    assert result["benchmark"] == "gpu" and MEMORY_KEYS <= set(result["train"])
    for name in ("chat_bfloat16", "chat_int8"):
        assert CHAT_KEYS <= set(result[name]) and result[name]["tokens_per_s"] > 0
    assert result["chat_int8"]["quantize"] == "int8" and result["chat_bfloat16"]["quantize"] is None


def test_eval_reports_items_per_second_at_each_batch_size():
    result = bench("--threads", "1", "eval", "--config", "tiny", "--items", "4", "--batch-sizes", "1,4",
                   "--new-tokens", "3")
    assert result["benchmark"] == "eval" and MACHINE_KEYS <= set(result["machine"])
    assert set(result["items_per_s"]) == {"1", "4"} and all(v > 0 for v in result["items_per_s"].values())
    assert result["speedup"] == result["items_per_s"]["4"] / result["items_per_s"]["1"]
