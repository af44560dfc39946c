"""Long sensor streams: LLM input tokens, prefill time and peak memory with none / avgpool / mambamia,
and exact-match accuracy on the sequence task for each compressor. All in one run.

Part 1, prefill. The LLM is the embedded SmolLM2-135M-Instruct (576 wide, 30 layers), extended with
the sequence demo's ``imu`` modality. For a stream of T sensor tokens (T = 1k ... 16k; tokens as
they leave the encoder and projector, i.e. the compressor's input) one prefill is: compressor ->
splice into the prompt "<imu> List the activities in order." -> the LLM's forward pass that fills
the KV cache and gives the first token's logits. The IMU encoder is not part of it: it costs the
same whatever the compressor, and is timed once per T in its own column (the sequence demo's local
encoder and projector on 4T steps, 4 steps per token). Per configuration: the best of ``--repeats`` runs (one run
when a run takes over 20 s) and the peak resident memory above the level before the call, sampled
every 2 ms with glibc told to return freed blocks of 128 KiB or more to the system at once (so
the figure follows live tensors). Compressor weights are freshly initialised: speed and memory
do not depend on their values.

Part 2, accuracy (skip with ``--skip-accuracy``): `hcx_extend.recipes.sequence.train_and_test` for
each compressor with the demo's settings and seed: train on streams from the train split, select
on held-out validation streams, then test once on streams from the test split.

    python benchmarks/long_sequence.py                   # everything (about an hour on 2 CPU cores)
    python benchmarks/long_sequence.py --skip-accuracy   # prefill table only
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import threading
import time
from pathlib import Path

import torch

COMPRESSOR_NAMES = ("none", "avgpool", "mambamia")
LENGTHS = (1000, 2000, 4000, 8000, 16000)


def keep_rss_honest() -> bool:
    """Ask glibc to mmap (and so unmap on free) every block of 128 KiB or more; False off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 128 * 1024)) and bool(libc.mallopt(m_trim_threshold, 128 * 1024))


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Context manager: ``.peak`` is the highest RSS above the level at entry, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes() - self.base)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        self.base = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes() - self.base)


def measure(fn, repeats: int) -> tuple[float, int]:
    """(best seconds, peak extra bytes) over up to ``repeats`` calls; a call over 20 s is not repeated."""
    best, peak = float("inf"), 0
    for _ in range(repeats):
        with PeakMemory() as memory:
            started = time.perf_counter()
            fn()
            seconds = time.perf_counter() - started
        best, peak = min(best, seconds), max(peak, memory.peak)
        if seconds > 20:
            break
    return best, peak


def prefill_table(repeats: int, lengths: tuple[int, ...]) -> list[dict]:
    from hcx_extend.checkpoint import cached_source, extend
    from hcx_extend.compressors import build_compressor, compressed_length
    from hcx_extend.data.long_sequence import sequence_chat
    from hcx_extend.presets import smollm2_gguf_path
    from hcx_extend.processor import OmniProcessor
    from hcx_extend.recipes.sequence import COMPRESSORS, SEQUENCE_TRAINING, sequence_modality
    from hcx_extend.splice import splice_modality_embeddings

    stride = SEQUENCE_TRAINING["stride"]
    torch.manual_seed(0)
    extended = extend(cached_source(smollm2_gguf_path()), [sequence_modality("mambamia", stride)])
    model, tokenizer = extended.model, extended.tokenizer
    model.eval()
    modality = model.config.modality("imu")
    modality.input.max_length = None  # the benchmark's streams are longer than the demo's
    hidden = model.config.text_config.hidden_size
    torch.manual_seed(0)
    compressors = {name: build_compressor(COMPRESSORS[name], hidden).eval() for name in COMPRESSOR_NAMES}
    processor = OmniProcessor(tokenizer, model.config)
    llm = model.language_model
    encoder, projector = model.model.imu_model, model.model.imu_projector

    def prompt_ids(name: str, tokens: int) -> torch.Tensor:
        """The processor's input_ids for a stream of ``tokens`` sensor tokens under compressor ``name``."""
        modality.compressor = dict(COMPRESSORS[name])
        ids = processor([sequence_chat()], {"imu": [torch.zeros(tokens * stride, 6)]})["input_ids"]
        assert int((ids == modality.token_id).sum()) == compressed_length(modality.compressor, tokens)
        return ids

    @torch.inference_mode()
    def prefill(name: str, ids: torch.Tensor, stream: torch.Tensor) -> None:
        compressed, lengths = compressors[name](stream, torch.tensor([stream.shape[1]]))
        embeds = splice_modality_embeddings(model.get_input_embeddings()(ids), ids, modality.token_id,
                                            [compressed[0, :int(lengths[0])]], "imu")
        llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)

    @torch.inference_mode()
    def encode(values: torch.Tensor) -> None:
        features, _ = encoder(values, torch.tensor([values.shape[1]]))
        projector(features)

    rows = []
    prefill("mambamia", prompt_ids("mambamia", 1000), torch.randn(1, 1000, hidden))  # warm-up
    for tokens in lengths:
        encoder_seconds, encoder_peak = measure(lambda: encode(torch.randn(1, tokens * stride, 6)), repeats)
        for name in COMPRESSOR_NAMES:
            ids = prompt_ids(name, tokens)
            stream = torch.randn(1, tokens, hidden)
            seconds, peak = measure(lambda: prefill(name, ids, stream), repeats)
            rows.append({"sensor_tokens": tokens, "compressor": name, "llm_input_tokens": ids.shape[1],
                         "placeholder_tokens": int((ids == modality.token_id).sum()), "prefill_seconds": seconds,
                         "peak_extra_mb": peak / 2**20, "encoder_seconds": encoder_seconds,
                         "encoder_peak_extra_mb": encoder_peak / 2**20})
            print(json.dumps(rows[-1]), flush=True)
    modality.compressor = dict(COMPRESSORS["mambamia"])
    return rows


def print_prefill(rows: list[dict]) -> None:
    print()
    print(f"{'sensor':>7} {'compressor':<9} {'LLM in':>7} {'prefill s':>10} {'peak MB':>9} {'tokens /':>9} "
          f"{'time /':>8} {'memory /':>9} {'encoder s':>10}")
    for row in rows:
        base = next(r for r in rows if r["sensor_tokens"] == row["sensor_tokens"] and r["compressor"] == "none")
        print(f"{row['sensor_tokens']:>7} {row['compressor']:<9} {row['llm_input_tokens']:>7} "
              f"{row['prefill_seconds']:>10.3f} {row['peak_extra_mb']:>9.0f} "
              f"{base['llm_input_tokens'] / row['llm_input_tokens']:>8.1f}x "
              f"{base['prefill_seconds'] / row['prefill_seconds']:>7.1f}x "
              f"{base['peak_extra_mb'] / max(row['peak_extra_mb'], 1.0):>8.1f}x {row['encoder_seconds']:>10.3f}")
    print("(ratios: none's value / this row's, same sensor length; 'LLM in' counts the whole prompt, text included)")


def accuracy_table(seed: int, settings: dict, names: list[str]) -> list[dict]:
    from hcx_extend.recipes.sequence import train_and_test

    rows = []
    for name in names:
        print(f"training with {name} ...", flush=True)
        metrics = train_and_test(name, seed=seed, settings=settings, log=lambda line: None)
        rows.append({key: metrics[key] for key in ("compressor", "test_exact_match", "test_activity_error_rate",
                                                    "llm_tokens_per_stream", "train_seconds", "steps",
                                                    "best_validation", "test_exact_match_by_recordings")})
        print(json.dumps(rows[-1]), flush=True)
    print()
    print(f"{'compressor':<9} {'exact match':>12} {'error rate':>11} {'LLM tokens/stream':>18} {'train s':>8}")
    for row in rows:
        print(f"{row['compressor']:<9} {row['test_exact_match']:>12.1%} {row['test_activity_error_rate']:>11.1%} "
              f"{row['llm_tokens_per_stream']['mean']:>18.0f} {row['train_seconds']:>8.0f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-accuracy", action="store_true", help="only the prefill table")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS), help="sensor tokens per stream")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="seed of the accuracy runs")
    parser.add_argument("--epochs", type=int, default=None, help="override the demo's epochs in the accuracy runs")
    parser.add_argument("--compressors", nargs="+", choices=COMPRESSOR_NAMES, default=["mambamia", "avgpool", "none"],
                        help="compressors of the accuracy runs (each a full training run)")
    parser.add_argument("--skip-prefill", action="store_true", help="only the accuracy runs")
    parser.add_argument("--output", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()

    honest = keep_rss_honest()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; glibc RSS tracking: {'on' if honest else 'off'}")
    results: dict = {}
    if not args.skip_prefill:
        results["prefill"] = prefill_table(args.repeats, tuple(args.lengths))
        print_prefill(results["prefill"])
    if not args.skip_accuracy:
        settings = {} if args.epochs is None else {"epochs": args.epochs}
        results["accuracy"] = accuracy_table(args.seed, settings, args.compressors)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
