"""Decode tokens/s of the oracle (flexpipe.model.reference) vs HF transformers `generate`, batch 1.

Both run the same random weights: a preset exported with save_checkpoint and loaded by HF with
from_pretrained. Decode rate = (N - 1) / (time(N tokens) - time(1 token)), so prefill is excluded;
the two are measured alternately in the same run, best of --repeats.

    .venv/bin/python benchmarks/bench_reference.py [--preset tiny | --hidden 256 --layers 8] [--tokens 128]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from flexpipe.model import ModelConfig, PresetWeights, ReferenceModel, SamplingParams, preset, save_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, help="model preset (default: a Llama with --hidden/--layers)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per run")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    if args.preset:
        cfg = preset(args.preset)
    else:
        cfg = ModelConfig(name=f"llama-h{args.hidden}-l{args.layers}", hidden_size=args.hidden,
                          intermediate_size=args.hidden * 11 // 4, num_layers=args.layers,
                          num_heads=args.hidden // 64, num_kv_heads=max(1, args.hidden // 128),
                          bos_token_id=256, eos_token_ids=(257,), pad_token_id=258)
    source = PresetWeights(cfg, seed=0)
    prompt = [(37 * i + 11) % 256 for i in range(args.prompt)]
    n = args.tokens

    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(cfg, source, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ref = ReferenceModel(cfg, source)
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)

    def run_hf(k: int) -> list[int]:
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k, do_sample=False)
        return out[0, len(prompt):].tolist()

    def run_ref(k: int) -> list[int]:
        return ref.generate(prompt, SamplingParams(max_tokens=k, ignore_eos=True))

    def timed(fn, k: int) -> float:
        t = time.perf_counter()
        fn(k)
        return time.perf_counter() - t

    same = run_hf(n) == run_ref(n)  # also the warm-up
    best = {"reference": [float("inf")] * 2, "hf": [float("inf")] * 2}
    for _ in range(args.repeats):
        for name, fn in (("reference", run_ref), ("hf", run_hf)):
            best[name][0] = min(best[name][0], timed(fn, 1))
            best[name][1] = min(best[name][1], timed(fn, n))
    rate = {k: (n - 1) / max(v[1] - v[0], 1e-9) for k, v in best.items()}
    params = sum(p.numel() for p in hf.parameters())
    print(f"model {cfg.name}: {params / 1e6:.1f}M params, fp32, CPU, {torch.get_num_threads()} threads; "
          f"prompt {len(prompt)}, {n} new tokens, batch 1, best of {args.repeats}")
    print(f"transformers {transformers.__version__}, torch {torch.__version__}; greedy tokens identical: {same}")
    print(f"reference decode: {rate['reference']:8.1f} tok/s")
    print(f"HF generate:      {rate['hf']:8.1f} tok/s")
    print(f"ratio reference / HF: {rate['reference'] / rate['hf']:.2f}x")


if __name__ == "__main__":
    main()
