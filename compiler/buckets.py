"""Sequence-length buckets for generation: the one place that decides which lengths get a graph.

mmaccel.generate pads every length it compiles for (prompt, static KV cache, encoder frames) up to a bucket,
so that any mix of prompt lengths and `max_new_tokens` runs on a bounded set of static-shape graphs (and, on
a GPU, a bounded set of CUDA-graph recordings). Padding is masked, so outputs equal unpadded eager.

Cost model. A bucket set trades padding work against graphs (each a compile of seconds, and on a GPU a
CUDA-graph recording whose private pool holds that graph's activations):
- Decode reads every weight once per token plus the whole static cache (masked positions included):
  step time ~ (weight bytes + batch * cache_len * kv_bytes_per_position) / bandwidth. For Llama-7B dims in
  fp16 (13.5 GB of weights, 0.5 MB of K/V per position) a cache padded from 2049 to 4096 positions reads 1 GB
  more per token (+7.5%), and at caches up to 1024 positions padding costs under 2%. Powers of two bound
  that overhead at 2x of a term that is small next to the weights, with one graph per doubling:
  CACHE_MIN, then powers of two, capped at the model's limit.
- Prefill runs once per call. Its matmuls read every weight once whatever the prompt, and do 2 * M FLOPs per
  weight element for M positions: below the GPU's ridge point (an H200: ~790 TFLOP/s over ~4.1 TB/s, about
  190 FLOPs per byte, M ~ 190 in bf16) a prefill costs its weight bytes and padding is nearly free; above it
  the time grows with the padded prompt, so a power-of-two step could double the first-token time (LLaVA-1.5's
  576 image tokens + 64 text = 640 would pad to 1024). Hence two buckets per octave up to 256 positions (16,
  24, 32, 48, 64, 96, 128, 192, 256: padding at most 1.5x where it is cheap) and four per octave from there
  (320, 384, 448, 512, 640, 768, 896, 1024, 1280, ...: at most 1.25x where it costs; LLaVA's 640 runs as
  640, where two per octave padded it to 768 and an H200 spent 29.8 ms on its first token); all are
  multiples of 8 for aligned matmuls.
- Prefill graphs are keyed by (prompt bucket, cache bucket), since prefill writes the cache; decode graphs by
  the cache bucket alone. Batch size is not bucketed: a new batch size is a new graph.
Nothing here has been tuned on a GPU yet: the constants follow from the byte counts above.
"""
from __future__ import annotations

PROMPT_MIN = 16
FINE_FROM = 256  # prompt buckets four per octave from here (compute-bound prefill), two below
CACHE_MIN = 64


def prompt_bucket(length: int) -> int:
    """The smallest of 16, 24, 32, 48, ..., 192, 256 (two per octave), then 320, 384, 448, 512, 640, ... (four
    per octave) holding `length`."""
    bucket = PROMPT_MIN
    while bucket < length:
        if bucket >= FINE_FROM:
            bucket += (1 << (bucket.bit_length() - 1)) // 4  # a quarter of the octave's start
        else:
            bucket = bucket * 3 // 2 if _is_power_of_two(bucket) else bucket * 4 // 3
    return bucket


def cache_bucket(length: int, limit: int) -> int:
    """The smallest power of two (at least CACHE_MIN) holding `length`, at most `limit`."""
    bucket = CACHE_MIN
    while bucket < length:
        bucket *= 2
    return min(bucket, limit)


def generation_buckets(prompt_len: int, new_tokens: int, limit: int, what: str = "prompt") -> tuple[int, int]:
    """(prompt bucket, cache bucket) for a prompt of `prompt_len` positions generating `new_tokens` tokens,
    where the model supports at most `limit` positions. Too long: ValueError naming the limit."""
    if prompt_len + new_tokens > limit:
        raise ValueError(f"mmaccel.generate: {what} of {prompt_len} positions + max_new_tokens={new_tokens} is "
                         f"{prompt_len + new_tokens} positions, past the model's limit of {limit} "
                         "(config.max_position_embeddings); shorten the prompt or lower max_new_tokens")
    prompt = prompt_bucket(prompt_len)
    cache = cache_bucket(prompt + new_tokens, limit)
    # Near the limit the padded prompt may not leave room for the new tokens: pad it less there (a graph
    # off the bucket set, only for prompts within one bucket of the limit).
    return min(prompt, cache - new_tokens), cache


def _is_power_of_two(n: int) -> bool:
    return n & (n - 1) == 0
