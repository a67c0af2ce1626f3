"""
Benchmarks of the things GRPO spends its time and memory on. Prints a table, then one JSON line.

    python bench.py                 # everything, on the reference configuration (6 layers, 6 heads, 384 wide)
    python bench.py --only=sample   # one section: peak, sample, train, logprobs, grpo, trl, load
    python bench.py --quick         # fewer repeats and a shorter no-cache run, for a smoke test

Sections:
  peak      float32 (or --dtype) matmul FLOP/s of large square matrices: the machine's practical peak.
  sample    new tokens/s: KV cache vs no cache, 8 prompts x 8 samples (16-token prompts, 64 new tokens), and
            64 prompts x 64 new tokens beside transformers' GPT2LMHeadModel.generate when it is installed, and
            the same decode's linear layers alone (`matmul_floor`): what no sampler of these weights can beat.
  train     forward+backward tokens/s on 32 x 128 tokens, and its FLOP/s as a share of `peak` (MFU); the same
            for GPT2LMHeadModel when transformers is installed.
  logprobs  peak memory and time of token log-probs (forward+backward) at GPT-2's vocab of 50257, 16 x 256
            tokens: chunked (model.ChunkedLogprob) vs the naive log_softmax + gather.
  grpo      seconds per whole grpo.grpo_step, 8 prompts x 8 samples x exactly 64 new tokens, beta 0 and 0.04,
            split into sampling and learning; and the learning pass's forward+backward with each group's shared
            prompt run once (learn_pass_group8) or once per row (learn_pass_group1).
  trl       the same step with TRL's GRPOTrainer beside it, when trl is installed (a dev-only extra).
  load      hf.load_gpt2 of a GPT-2-small-sized model.safetensors (498 MB, float32): seconds, and peak
            memory growth in a fresh process as a multiple of the file (the model itself is 1.0x).

Throughput on shared CPUs wanders by tens of percent between runs: compare figures from the same run only.
transformers is optional and used here only, to compare with the library most people would otherwise use.
"""

import argparse
import functools
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from model import GPT, ChunkedLogprob, GPTConfig, sample
from tests.reference import sample_without_cache  # the no-cache sampler the cache is checked against

REFERENCE = GPTConfig(block_size=256, vocab_size=512, n_layer=6, n_head=6, n_embd=384)
GPT2_SMALL = GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768)  # --model=gpt2


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    """Best wall time of `repeats` calls after one warm-up call (best-of is the least noisy on shared CPUs)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def peak_memory(case, device):
    """Peak bytes that one call of logprob_case(case) allocates above what it held before. On CUDA, the
    allocator's high-water mark; on CPU (PyTorch keeps none there), peak RSS growth in a fresh process (Linux)."""
    if device.type == "cuda":
        fn = logprob_case(case, device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    out = subprocess.run([sys.executable, __file__, f"--memory-worker={case}"], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip().splitlines()[-1])


def status(field):  # kB figures from /proc/self/status (Linux)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_worker(case):
    fn = logprob_case(case, torch.device("cpu"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    before = status("VmRSS")
    fn()
    print((status("VmHWM") - before) * 1024)


def bench_peak(device, dtype, repeats):
    """The best matmul rate over a square shape and the shapes of a training step (best of several calls each):
    throughput on shared machines wanders, and an MFU against a low peak reads above 100%."""
    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (4096, 384, 1536), (4096, 1536, 384)):
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        best = max(best, 2 * m * k * n / timed(lambda: a @ b, device, repeats * 4) / 1e9)
    return best


def train_flops_per_token(config, seq_len):
    """Matmul FLOPs of forward+backward for one token (backward = 2x forward), PaLM/nanoGPT convention:
    6 per weight of every layer and the lm_head, plus 12 * n_layer * n_embd * seq_len for attention."""
    c = config
    weights = c.n_layer * 12 * c.n_embd ** 2 + c.vocab_size * c.n_embd
    return 6 * weights + 12 * c.n_layer * c.n_embd * seq_len


def hf_model(config, device):
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    hf_config = GPT2Config(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                           vocab_size=config.vocab_size, n_positions=config.block_size,
                           bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(hf_config).to(device).eval()


def bench_sample(model, device, repeats, quick):
    out = {}
    g = torch.Generator(device).manual_seed(0)
    prompts8 = torch.randint(0, model.config.vocab_size, (8, 16)).tolist()
    prompts64 = torch.randint(0, model.config.vocab_size, (64, 16)).tolist()
    secs = timed(lambda: sample(model, prompts8, group_size=8, max_new_tokens=64, generator=g), device, repeats)
    out["sample_8x8_cache_tok_s"] = 64 * 64 / secs
    new = 16 if quick else 64  # the no-cache path reruns the whole sequence every step: slow by design
    secs = timed(lambda: sample_without_cache(model, prompts8, group_size=8, max_new_tokens=new, generator=g),
                 device, 1)
    out["sample_8x8_nocache_tok_s"] = 64 * new / secs
    secs = timed(lambda: sample(model, prompts64, max_new_tokens=64, generator=g), device, repeats)
    out["sample_64x1_cache_tok_s"] = 64 * 64 / secs
    secs = timed(lambda: decode_matmuls(model, rows=64, steps=64), device, repeats)
    out["sample_64x1_matmul_floor_tok_s"] = 64 * 64 / secs
    hf = hf_model(model.config, device)
    if hf is not None:
        x = torch.tensor(prompts64, device=device)
        with torch.no_grad():
            def generate():
                return hf.generate(x, attention_mask=torch.ones_like(x), do_sample=True, max_new_tokens=64,
                                   min_new_tokens=64, pad_token_id=0)
            secs = timed(generate, device, repeats)
        out["hf_generate_64x1_tok_s"] = 64 * 64 / secs
    return out


@torch.no_grad()
def decode_matmuls(model, rows, steps):
    """The decode's linear layers alone, once per step on `rows` rows, nothing else: no attention, no cache, no
    sampling. Its throughput is a ceiling for any sampler running these weights with these matmuls."""
    device, C = model.lm_head.weight.device, model.config.n_embd
    inputs = {C: torch.randn(rows, C, device=device), 4 * C: torch.randn(rows, 4 * C, device=device)}
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]  # lm_head included
    for _ in range(steps):
        for layer in layers:
            layer(inputs[layer.in_features])


def bench_train(model, device, dtype, peak, repeats):
    out = {}
    B, T = 32, 128
    x = torch.randint(0, model.config.vocab_size, (B, T), device=device)
    y = torch.randint(0, model.config.vocab_size, (B, T), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    flops = train_flops_per_token(model.config, T) * B * T

    def step(m, hf=False):
        with autocast:
            loss = m(x, labels=x).loss if hf else m(x, y)[1]
        loss.backward()

    model.train()
    secs = timed(lambda: step(model), device, repeats)
    out["train_tok_s"] = B * T / secs
    out["train_gflops"] = flops / secs / 1e9
    out["train_mfu"] = out["train_gflops"] / peak
    hf = hf_model(model.config, device)
    if hf is not None:
        hf.train()
        secs = timed(lambda: step(hf, hf=True), device, repeats)
        out["hf_train_tok_s"] = B * T / secs
        out["hf_train_mfu"] = flops / secs / 1e9 / peak
    model.eval()
    return out


def logprob_case(case, device):
    """Forward+backward of token log-probs at GPT-2's vocab for 16 x 256 tokens, chunked or naive."""
    torch.manual_seed(0)
    N, C, V = 16 * 256, 384, 50257
    h = torch.randn(N, C, device=device, requires_grad=True)
    weight = (torch.randn(V, C, device=device) * 0.02).requires_grad_()
    target = torch.randint(0, V, (N,), device=device)

    def naive():
        logp = F.log_softmax(h @ weight.t(), -1).gather(1, target[:, None]).squeeze(1)
        logp.sum().backward()

    def chunked():
        ChunkedLogprob.apply(h, weight, target, 1.0, 512, False)[0].sum().backward()

    return {"naive": naive, "chunked": chunked}[case]


def bench_logprobs(device, repeats):
    out = {}
    for case in ("naive", "chunked"):
        out[f"logprobs_{case}_peak_mb"] = peak_memory(case, device) / 2 ** 20
        out[f"logprobs_{case}_s"] = timed(logprob_case(case, device), device, repeats)
    out["logprobs_memory_ratio"] = out["logprobs_chunked_peak_mb"] / out["logprobs_naive_peak_mb"]
    return out


def bench_load():
    """Peak memory and time of loading a GPT-2-small-sized directory (written by hf.export)."""
    import os
    import tempfile

    import hf
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        hf.export(GPT(GPT2_SMALL), None, tmp, "none", gpt2_dir=None, tokenizer=False)
        size = os.path.getsize(os.path.join(tmp, "model.safetensors"))
        out = subprocess.run([sys.executable, __file__, f"--load-worker={tmp}"], capture_output=True, text=True,
                             check=True).stdout.split()
    return {"load_file_mb": size / 2 ** 20, "load_s": float(out[-1]), "load_peak_vs_file": int(out[-2]) / size}


def load_worker(path):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    import hf
    t0 = time.perf_counter()
    hf.load_gpt2(path)
    print((status("VmHWM") - before) * 1024, time.perf_counter() - t0)


def bench_grpo(model, device, repeats):
    import grpo  # imported here so the other sections run before grpo.py exists in a checkout

    out = {}
    prompts = torch.randint(0, model.config.vocab_size, (8, 16)).tolist()
    examples = [None] * len(prompts)

    def reward(completion_tokens, example):  # cheap and content-dependent, so every group has spread
        return sum(t % 7 == 0 for t in completion_tokens) / max(1, len(completion_tokens))

    for beta in (0.0, 0.04):
        policy = GPT(model.config).to(device)
        policy.load_state_dict(model.state_dict())
        reference = None
        if beta > 0:
            reference = GPT(model.config).to(device).eval().requires_grad_(False)
            reference.load_state_dict(model.state_dict())
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
        config = grpo.GRPOConfig(group_size=8, max_new_tokens=64, beta=beta, num_iterations=1)
        g = torch.Generator(device).manual_seed(0)
        times = []
        for _ in range(repeats + 1):
            sync(device)
            metrics = grpo.grpo_step(policy, optimizer, prompts, examples, [reward], config, reference=reference,
                                     generator=g, decode=lambda toks: toks)
            times.append((metrics["time_sample_s"], metrics["time_learn_s"]))
        best = min(times[1:], key=sum)
        key = f"grpo_beta{beta:g}"
        out[f"{key}_step_s"], out[f"{key}_sample_s"], out[f"{key}_learn_s"] = sum(best), best[0], best[1]

    # The learning pass's forward+backward over one rollout, each group's prompt run once (as grpo_step does)
    # or once per row: what model.grouped_hidden_states saves.
    rollout = sample(model, prompts, group_size=8, max_new_tokens=64, generator=g)

    def learn(group_size):
        model.logprobs(rollout.tokens, rollout.prompt_len, group_size=group_size)[0].sum().backward()

    for group_size in (8, 1):
        out[f"learn_pass_group{group_size}_s"] = timed(functools.partial(learn, group_size), device, repeats)
    model.zero_grad(set_to_none=True)
    return out


def bench_trl(model, device, repeats):
    """TRL's GRPOTrainer on the same batch as bench_grpo, when trl is installed: a GPT2LMHeadModel of the same
    shape, 8 prompts of 16 tokens x 8 completions of exactly 64 tokens, one optimizer step per generation batch,
    float32, no gradient checkpointing (TRL's default turns it on: recomputation a fair comparison leaves out).
    Seconds per trainer step, best of `repeats` after a warm-up step, taken by a callback."""
    try:
        import datasets
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        return {}
    import tempfile
    V = model.config.vocab_size
    word_level = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t1"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="t0", pad_token="t0")
    prompts = [" ".join(f"t{t}" for t in row) for row in torch.randint(1, V, (8, 16)).tolist()]
    dataset = datasets.Dataset.from_dict({"prompt": prompts * (repeats + 2)})

    def reward(completions, **kwargs):  # the same cheap, content-dependent reward as bench_grpo
        return [sum(int(t[1:]) % 7 == 0 for t in c.split()) / max(1, len(c.split())) for c in completions]

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            times.append(time.perf_counter() - self.t0)

    out = {}
    for beta in (0.0, 0.04):
        times = []
        with tempfile.TemporaryDirectory() as tmp:
            hf_model(model.config, device).save_pretrained(f"{tmp}/model")  # TRL builds its reference from a path
            args = GRPOConfig(output_dir=tmp, per_device_train_batch_size=64, num_generations=8,
                              max_completion_length=64, generation_kwargs={"min_new_tokens": 64}, beta=beta,
                              learning_rate=1e-5, gradient_checkpointing=False, bf16=False,
                              use_cpu=device.type == "cpu", max_steps=repeats + 1, report_to="none",
                              save_strategy="no", logging_steps=1, disable_dropout=True)
            trainer = GRPOTrainer(model=f"{tmp}/model", reward_funcs=reward, args=args, train_dataset=dataset,
                                  processing_class=tokenizer, callbacks=[StepTimer()])
            trainer.train()
        out[f"trl_beta{beta:g}_step_s"] = min(times[1:])
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="peak,sample,train,logprobs,grpo,trl,load",
                        help="comma-separated sections")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--dtype", default="float32",
                        help="float32 or bfloat16 (autocast for sample, train, grpo)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, a shorter no-cache run")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model for train")
    parser.add_argument("--model", default="reference", help="reference (6 x 6 x 384, vocab 512) or gpt2 "
                                                             "(GPT-2 small: 12 x 12 x 768, vocab 50257)")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)  # internal: one logprobs case, fresh process
    parser.add_argument("--load-worker", help=argparse.SUPPRESS)  # internal: one from_pretrained, fresh process
    args = parser.parse_args()
    if args.memory_worker:
        return memory_worker(args.memory_worker)
    if args.load_worker:
        return load_worker(args.load_worker)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    sections = set(args.only.split(","))
    repeats = 1 if args.quick else 3
    torch.manual_seed(0)
    model = GPT({"reference": REFERENCE, "gpt2": GPT2_SMALL}[args.model]).to(device).eval()
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
               "model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(),
               "torch": torch.__version__,
               "params_M": round(model.num_params() / 1e6, 2)}
    peak = bench_peak(device, dtype, repeats)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    if "sample" in sections:
        with autocast:  # ours and generate alike
            results.update(bench_sample(model, device, repeats, args.quick))
    if "train" in sections:
        peak = max(peak, bench_peak(device, dtype, repeats))  # again, next to the measurement it divides
        trained = torch.compile(model) if args.compile else model
        results.update(bench_train(trained, device, dtype, peak, repeats))
    results["peak_matmul_gflops"] = peak
    if "logprobs" in sections:
        results.update(bench_logprobs(device, repeats))
    if "grpo" in sections:
        with autocast:
            results.update(bench_grpo(model, device, repeats))
    if "load" in sections:
        results.update(bench_load())
    if "trl" in sections:
        results.update(bench_trl(model, device, repeats))
        for beta in ("0", "0.04"):
            if f"trl_beta{beta}_step_s" in results and f"grpo_beta{beta}_step_s" in results:
                results[f"grpo_beta{beta}_speedup_vs_trl"] = (results[f"trl_beta{beta}_step_s"] /
                                                               results[f"grpo_beta{beta}_step_s"])
    if "sample_8x8_nocache_tok_s" in results:
        results["sample_cache_speedup"] = results["sample_8x8_cache_tok_s"] / results["sample_8x8_nocache_tok_s"]
    if "hf_generate_64x1_tok_s" in results:
        results["sample_vs_hf_generate"] = results["sample_64x1_cache_tok_s"] / results["hf_generate_64x1_tok_s"]
        results["matmul_floor_vs_hf_generate"] = (results["sample_64x1_matmul_floor_tok_s"] /
                                                  results["hf_generate_64x1_tok_s"])
    width = max(len(k) for k in results)
    for k, v in results.items():
        print(f"{k:<{width}}  {v:,.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
