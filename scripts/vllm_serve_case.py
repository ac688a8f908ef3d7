"""Run inside a vLLM (CPU build) environment: one model, one adapter, next-token log-probs for each prefix.

    python vllm_serve_case.py MODEL ADAPTER|- TOKENS.json OUT.json

Writes {"logprobs": [[log p(token) for every token] for each prefix]} or {"error": "..."}. One
engine per process: after a refused adapter vLLM's in-process engine can hang, so the caller
runs each case in its own process with a timeout. prompt_logprobs crash with LoRA enabled in
vLLM 0.32, so the full distribution of the first generated token is read for each prefix.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


def main() -> None:
    model, adapter, tokens_path, out_path = sys.argv[1:5]
    tokens = json.load(open(tokens_path))
    config = json.load(open(os.path.join(model, "config.json")))
    vocab = config.get("vocab_size") or config["text_config"]["vocab_size"]  # a vision-language model: its text part
    try:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        llm = LLM(
            model=model,
            dtype="float32",
            skip_tokenizer_init=True,
            enforce_eager=True,
            max_model_len=64,
            max_logprobs=vocab,
            enable_lora=adapter != "-",
            max_lora_rank=64,
            max_loras=1,
            max_num_seqs=len(tokens),
            seed=0,
        )
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=vocab, detokenize=False)
        lora = LoRARequest("adapter", 1, adapter) if adapter != "-" else None
        prompts = [{"prompt_token_ids": tokens[:n]} for n in range(1, len(tokens) + 1)]
        outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        result = {"logprobs": [[o.outputs[0].logprobs[0][i].logprob for i in range(vocab)] for o in outputs]}
    except Exception as e:  # a refused adapter: vLLM's own message
        lines = [line for line in traceback.format_exception_only(type(e), e) if line.strip()]
        result = {"error": lines[-1].strip()}
    with open(out_path, "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    os._exit(0)  # do not wait for vLLM's engine threads


if __name__ == "__main__":
    main()
