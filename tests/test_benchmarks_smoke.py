"""Every benchmark script runs end to end in its CI-smoke mode (tiny sizes, one repeat).

The scripts start together, each in its own process (as a user runs them), so the suite waits
for the slowest rather than the sum; each test then checks its script's report.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from facellm_jax.training import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMANDS = {
    "vs_transformers": ["benchmarks/vs_transformers.py", "--smoke", "--json"],
    "gpu_mfu": ["benchmarks/gpu_mfu.py", "--smoke", "--json"],
    "gpu_mfu_without_gpu": ["benchmarks/gpu_mfu.py", "--rows", "1b:lora"],
    "input_pipeline": ["benchmarks/input_pipeline.py", "--smoke"],
    "generation_throughput": ["benchmarks/generation_throughput.py", "--requests", "6", "--concurrency", "3",
                              "--latency", "0.05"],
    "facexbench_throughput": ["benchmarks/facexbench_throughput.py", "--smoke", "--preset", "fast"],
}


@pytest.fixture(scope="module")
def reports():
  """Script name -> (exit code, stdout, stderr); all scripts run concurrently."""
  env = dict(os.environ)
  # One CPU device per process (the scripts do not shard; 8 fake devices only cost start-up), and
  # cheaper LLVM codegen: compiling dominates these runs, and they check behaviour, not speed.
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"])
  procs = {name: subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
           for name, cmd in COMMANDS.items()}
  out = {}
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=600)
    out[name] = (proc.returncode, stdout, stderr)
  return out


def _last_json(reports, name: str) -> dict:
  code, stdout, stderr = reports[name]
  assert code == 0, f"{name} failed:\n{stderr[-3000:]}"
  return json.loads(stdout.strip().splitlines()[-1])


def test_vs_transformers_reports_both_ratios_from_matching_runs(reports):
  r = _last_json(reports, "vs_transformers")
  for key in ("train_step", "generate"):
    ours, theirs = r[f"{key}_ours_s"], r[f"{key}_theirs_s"]
    assert ours > 0 and theirs > 0
    assert r[f"{key}_ratio"] == pytest.approx(ours / theirs, rel=0.01, abs=1e-3)
  # Same weights, same inputs, same optimizer: the two frameworks train and decode alike.
  assert r["train_loss_max_rel_diff"] < 1e-4
  assert len(r["train"]["losses_ours"]) == len(r["train"]["losses_theirs"]) == 4  # warm-up, memory call, warm-up, one repeat
  assert r["generate_tokens_equal_fraction"] == 1.0
  assert r["generate"]["new_tokens_per_row"] == [r["size"]["new_tokens"]] * r["size"]["batch"]
  assert r["threads_xla_and_torch"] >= 1 and r["peak_rss_mb"] > 0


def test_gpu_mfu_smoke_trains_both_modes_on_the_tiny_config(reports):
  r = _last_json(reports, "gpu_mfu")
  assert [row["row"] for row in r["rows"]] == ["tiny:lora", "tiny:full"]
  for row in r["rows"]:
    assert row["status"] == "ok", row
    assert row["tokens_per_s"] == pytest.approx(row["batch_per_device"] * row["seq_len"] / row["step_s"], rel=0.01)
    assert row["mfu"] is None  # a CPU has no bf16 peak to divide by
    assert row["peak_host_rss_gb"] > 0 and row["xla_step_gb"] > 0
  lora, full = r["rows"]
  assert lora["trainable_params"] < full["trainable_params"] / 5
  assert lora["flops_per_step"] < full["flops_per_step"]


def test_gpu_mfu_on_a_cpu_without_smoke_exits_with_a_one_line_reason(reports):
  code, stdout, stderr = reports["gpu_mfu_without_gpu"]
  assert code == 2
  assert stderr.strip().splitlines()[-1] == "gpu_mfu: no GPU/TPU found; on a CPU run the smoke test (--smoke)"


def _gpu_mfu():
  sys.path.insert(0, str(ROOT / "benchmarks"))
  try:
    import gpu_mfu
  finally:
    sys.path.pop(0)
  return gpu_mfu


def test_gpu_mfu_batch_fills_the_memory_left_after_the_fixed_buffers():
  fit = _gpu_mfu().fit_batch
  gb = 2**30
  # 80 GB device: 0.9 * 80 = 72 GB planned; 12 GB fixed (20 needed at batch 1, 8 of them temporaries).
  assert fit(20 * gb, 8 * gb, limit=80 * gb, max_batch=64) == 7
  assert fit(20 * gb, 8 * gb, limit=80 * gb, max_batch=4) == 4
  assert fit(75 * gb, 8 * gb, limit=80 * gb, max_batch=64) == 1  # nothing to spare: still try one row


def test_input_pipeline_smoke_compares_with_the_h100_demand(reports):
  r = _last_json(reports, "input_pipeline")
  assert r["smoke"] and r["rows"] and all(row["examples_per_s"] > 0 for row in r["rows"])
  assert r["h100_need"]["examples_per_s_full"] > 0


def test_generation_throughput_runs_against_the_fake_server(reports):
  r = _last_json(reports, "generation_throughput")
  assert r["requests"] == 6 and r["parallel_s"] > 0 and r["serial_s"] > 0


def test_flops_count_causal_attention_as_half():
  c = _gpu_mfu().load_config("1b")
  t = c.text
  one = step_lib.train_flops_per_step(c, rows=1, seq_len=2048, images=0)
  two = step_lib.train_flops_per_step(c, rows=1, seq_len=4096, images=0)
  # Doubling T doubles the weight FLOPs and quadruples the causal attention term 3*4*T^2*q*L/2.
  attn = (two - 2 * one) / 2
  assert attn == pytest.approx(3 * 4 * 2048**2 * t.num_attention_heads * t.head_dim * t.num_hidden_layers / 2)
  # InternVL3-1B's LLM is Qwen2.5-0.5B: 494 M parameters, its tied embedding being our LM head's
  # matmul (norms and biases are 0.01%); full fine-tuning costs 6 FLOPs per weight and token.
  assert (one - attn) / 2048 == pytest.approx(6 * 494e6, rel=0.005)


def test_facexbench_throughput_answers_alike_before_and_after(reports):
  r = _last_json(reports, "facexbench_throughput")
  assert r["questions"] == 16 and r["max_new_tokens"] == 32
  assert r["predictions_equal"] is True  # batching by length and the staged cache change no answer
  assert r["before_qps"] > 0 and r["after_qps"] > 0
  assert r["speedup"] == pytest.approx(r["after_qps"] / r["before_qps"], rel=0.02)
