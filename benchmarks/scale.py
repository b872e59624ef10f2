"""Scale: does every stage stay flat in memory as the token budget grows, and do its parallel forms pay?

Prints, side by side from one run on this machine (every figure a ratio of two runs made here, one after
the other):

1. data tokens/s with `data.num_proc` 1 vs 2 (the embedded SmolLM2 tokenizer, the same JSONL source);
2. capture tokens/s with 1 vs 2 workers under torchrun (one thread each) over the same rows, SmolLM2 teacher,
   wall time of the whole command (teacher load included);
3. train step time of 2 processes with FSDP vs DDP (gloo, one thread each), the 8-layer SmolLM2 student;
4. peak RSS of the data, capture and train stages at a small vs a large training budget (default 2M vs 32M
   tokens), each stage its own `distill` process: the ratio (target ≤ 1.2) and the growth in bytes per
   extra training token (target ≤ 0.5 B). So that capturing 32M tokens takes minutes on a CPU, this part
   uses a teacher with a 512-token BPE vocabulary trained here (a real tokenizer and a real, random, 2-layer
   LLaMA; memory is about rows and shards, not the teacher's size).

Plain script, not a test (about 20–30 minutes on a 2-core CPU at the defaults):

    .venv/bin/python benchmarks/scale.py [--small 2000000] [--large 32000000] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TORCHRUN = str(Path(PY).with_name("torchrun"))
# Runs a command and prints its children's peak RSS (ru_maxrss: the largest single process, in KiB).
_PEAK = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); rc = subprocess.call(sys.argv[1:]); "
         "print(json.dumps({'rc': rc, 's': time.perf_counter() - t, "
         "'kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")


def measured(cmd: list[str], threads: int = 2, log: Path | None = None) -> tuple[float, int]:
    """(seconds, peak RSS in bytes) of `cmd` run in a fresh process tree; output goes to `log`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with open(log or os.devnull, "a") as out:
        done = subprocess.run([PY, "-c", _PEAK, *cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=out,
                              text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {result['rc']}); see {log}")
    return result["s"], result["kib"] * 1024


def distill(verb: str, config: Path, run: Path, *extra: str) -> list[str]:
    return [PY, "-m", "distill.cli", verb, str(config), *extra, "--output-dir", str(run)]


def write_config(path: Path, teacher: str, corpus: Path, tokens: int, **sections) -> Path:
    cfg = {
        "teacher": {"model": teacher, "batch_size": 4},
        "data": {"seq_len": 256, "train_tokens": tokens, "heldout_sequences_per_domain": 2,
                 "sources": [{"name": "web", "kind": "jsonl", "path": str(corpus), "domain": "general"}]},
        "capture": {"top_k": 8, "sequences_per_shard": 256},
        "student": {"size": "tiny-2l", "init": "scratch"},
        "train": {"max_steps": 20, "batch_size": 4, "save_every": 0, "log_every": 5},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---------------------------------------------------------------------------------------------------
# Inputs made here: a JSONL corpus of real text, a small-vocabulary teacher
# ---------------------------------------------------------------------------------------------------


def make_corpus(path: Path, chars: int) -> Path:
    """JSONL of the built-in corpora's documents (general text, math, Python), shuffled so that every prefix
    has the same mix (the small and the large budget then see the same kind of text), cycled to `chars`
    characters; each copy is numbered so no two documents are identical."""
    import random

    from distill.corpora import builtin_corpus

    docs = [d for domain in ("general", "math", "code") for d in builtin_corpus(domain, "train")]
    random.Random(0).shuffle(docs)
    written, copy = 0, 0
    with open(path, "w") as f:
        while written < chars:
            for doc in docs:
                f.write(json.dumps({"text": f"[{copy}] {doc}"}) + "\n")
                written += len(doc)
                if written >= chars:
                    break
            copy += 1
    return path


def small_vocab_teacher(folder: Path, corpus: Path) -> Path:
    """A random 2-layer LLaMA with a 512-token byte-level BPE trained on the first documents of `corpus`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for _, line in zip(range(3000), open(corpus), strict=False)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32, intermediate_size=128, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------
# The four measurements
# ---------------------------------------------------------------------------------------------------


def data_parallel(work: Path, corpus: Path, tokens: int, log: Path) -> dict[str, float]:
    """Data-stage tokens/s, num_proc 1 vs 2, SmolLM2 tokenizer; chunks of 2M characters, so the budget
    spans several (a chunk is the unit of parallel work)."""
    out = {}
    for procs in (1, 2):
        cfg = write_config(work / f"data-np{procs}.yaml", "embedded:smollm2-135m-instruct", corpus, tokens,
                           data={"num_proc": procs, "shard_chars": 2_000_000})
        shutil.rmtree(work / f"data-np{procs}", ignore_errors=True)  # measured from scratch
        seconds, _ = measured(distill("data", cfg, work / f"data-np{procs}"), threads=1, log=log)
        out[procs] = tokens / seconds
    return out


def rss_by_stage(work: Path, teacher: Path, corpus: Path, budgets: tuple[int, int], log: Path,
                 stages: tuple[str, ...] = ("data", "capture", "train"), train_repeats: int = 3,
                 reuse: bool = False) -> dict:
    """Peak RSS (bytes) of each of `stages` at each budget; one process per stage. The train stage is run
    `train_repeats` times (its train/ folder removed before each) and its mean reported: a single pair of
    runs varies by a few MiB, the size of the whole budget. `reuse`: keep the runs an earlier call left in
    `work` (their data, capture and student stages are then not rebuilt, so only train is measured)."""
    peaks: dict[str, dict[int, int]] = {stage: {} for stage in stages}
    for tokens in budgets:
        run = work / f"rss-{tokens}"
        if not reuse:
            shutil.rmtree(run, ignore_errors=True)
        # Chunks of 1M characters: both budgets span many, so the figure is what grows with the budget
        # (a chunk in flight costs the same in both).
        cfg = write_config(work / f"rss-{tokens}.yaml", str(teacher), corpus, tokens,
                           data={"shard_chars": 1_000_000})
        needed = {"data": {"data"}, "capture": {"data", "capture"}, "train": {"data", "capture", "student", "train"}}
        for stage in [s for s in ("data", "capture", "student", "train") if any(s in needed[t] for t in stages)]:
            repeats = train_repeats if stage == "train" else 1
            runs = []
            for _ in range(repeats):
                if stage == "train":
                    shutil.rmtree(run / "train", ignore_errors=True)
                # One thread: the tiny teacher's kernels are too small to share, and the figure is memory.
                runs.append(measured(distill(stage, cfg, run), threads=1, log=log))
            if stage in peaks:
                peaks[stage][tokens] = round(sum(peak for _, peak in runs) / len(runs))
                each = ", ".join(f"{peak / 2**20:.1f}" for _, peak in runs)
                print(f"  {stage:8s} {tokens / 1e6:5.0f}M tokens: peak RSS {peaks[stage][tokens] / 2**20:7.1f} MiB "
                      f"(runs: {each}), {runs[-1][0]:6.0f} s", flush=True)
    return peaks


def capture_workers(work: Path, run: Path, cfg: Path, log: Path) -> dict[int, float]:
    """Capture tokens/s with 1 and 2 torchrun workers (one thread each) over the same rows."""
    from core.artifacts import read_manifest

    num = read_manifest(run / "data", "data")["train_tokens"]
    out = {}
    for workers in (1, 2):
        target = work / f"capture-w{workers}"
        shutil.rmtree(target / "logits", ignore_errors=True)
        if not (target / "data").exists():
            (target).mkdir(exist_ok=True)
            os.symlink(run / "data", target / "data")
        cmd = [TORCHRUN, "--nproc-per-node", str(workers), "--master-port", str(29600 + workers),
               "-m", "teachers.capture", str(cfg), str(target)]
        seconds, _ = measured(cmd, threads=1, log=log)
        out[workers] = num / seconds
    return out


def fsdp_vs_ddp(work: Path, run: Path, cfg: Path, log: Path) -> dict[str, float]:
    """Seconds per optimizer step (from the loop's own tokens/s), 2 processes, FSDP vs DDP."""
    from distill.trainer import read_metrics

    out = {}
    for parallelism in ("ddp", "fsdp"):
        target = work / f"train-{parallelism}"
        shutil.rmtree(target / "train", ignore_errors=True)
        target.mkdir(exist_ok=True)
        for stage in ("data", "logits", "student_init"):
            if not (target / stage).exists():
                os.symlink(run / stage, target / stage)
        cmd = [TORCHRUN, "--nproc-per-node", "2", "--master-port", "29610", "-m", "distill.trainer", str(cfg),
               str(target), f"train.parallelism={parallelism}"]
        measured(cmd, threads=1, log=log)
        last = read_metrics(target / "train" / "metrics.jsonl")[-1]
        out[parallelism] = last["tokens"] / last["tokens_per_s"] / last["step"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", type=int, default=2_000_000, help="small training budget (tokens)")
    parser.add_argument("--large", type=int, default=32_000_000, help="large training budget (tokens)")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temp dir)")
    parser.add_argument("--parts", default="1,2,3,4", help="which measurements, e.g. 1,4")
    parser.add_argument("--rss-stages", default="data,capture,train", help="stages whose peak RSS part 4 measures")
    parser.add_argument("--train-repeats", type=int, default=3, help="part 4: runs of the train stage per budget")
    parser.add_argument("--reuse-runs", action="store_true",
                        help="part 4: keep the runs of an earlier call in --work (use with --rss-stages train)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="distill-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    print(f"working in {work} (logs: {log})", flush=True)

    parts = {int(p) for p in args.parts.split(",")}
    corpus = work / "corpus.jsonl"
    if not corpus.is_file():
        make_corpus(corpus, chars=args.large * 4)
    started = time.perf_counter()
    if 1 in parts:
        data_speed(work, corpus, log)
    if 2 in parts or 3 in parts:
        smollm2_parts(work, corpus, parts, log)
    if 4 in parts:
        memory(work, corpus, args.small, args.large, log, tuple(args.rss_stages.split(",")), args.train_repeats,
               args.reuse_runs)
    print(f"total {time.perf_counter() - started:.0f} s")


def data_speed(work: Path, corpus: Path, log: Path) -> None:
    # Enough tokens that the workers' start (a Python import of transformers each) is a small part.
    tok_s = data_parallel(work, corpus, 16_000_000, log)
    print(f"1. data tokens/s (16M tokens, SmolLM2 tokenizer): num_proc 1 {tok_s[1]:,.0f}, num_proc 2 "
          f"{tok_s[2]:,.0f} → ×{tok_s[2] / tok_s[1]:.2f}", flush=True)


def smollm2_parts(work: Path, corpus: Path, parts: set[int], log: Path) -> None:

    base = work / "smollm2"
    cfg = write_config(work / "smollm2.yaml", "embedded:smollm2-135m-instruct", corpus, 16_384,
                       capture={"top_k": 64, "sequences_per_shard": 8},
                       student={"size": "smollm2-prune-8l", "init": "teacher"},
                       train={"max_steps": 8, "batch_size": 2, "log_every": 1})
    for stage in ("data", "capture", "student"):
        measured(distill(stage, cfg, base), log=log)
    if 2 in parts:
        capture_speed(work, base, cfg, log)
    if 3 in parts:
        train_speed(work, base, cfg, log)


def capture_speed(work: Path, base: Path, cfg: Path, log: Path) -> None:
    rates = capture_workers(work, base, cfg, log)
    print(f"2. capture tokens/s (SmolLM2, one thread per worker): 1 worker {rates[1]:,.0f}, 2 workers {rates[2]:,.0f} "
          f"→ ×{rates[2] / rates[1]:.2f}", flush=True)


def train_speed(work: Path, base: Path, cfg: Path, log: Path) -> None:
    step = fsdp_vs_ddp(work, base, cfg, log)
    print(f"3. train step, 2 processes (8-layer SmolLM2 student, 2 × 256-token rows each): DDP {step['ddp']:.2f} s, "
          f"FSDP {step['fsdp']:.2f} s → FSDP/DDP ×{step['fsdp'] / step['ddp']:.2f}", flush=True)


def memory(work: Path, corpus: Path, small: int, large: int, log: Path, stages: tuple[str, ...],
           train_repeats: int, reuse: bool) -> None:
    teacher = work / "teacher-bpe512"
    if not teacher.is_dir():
        small_vocab_teacher(teacher, corpus)
    print(f"4. peak RSS, {small / 1e6:.0f}M vs {large / 1e6:.0f}M training tokens:", flush=True)
    peaks = rss_by_stage(work, teacher, corpus, (small, large), log, stages, train_repeats, reuse)
    for stage, by_budget in peaks.items():
        growth = (by_budget[large] - by_budget[small]) / (large - small)
        print(f"   {stage:8s} ratio {by_budget[large] / by_budget[small]:.3f}, growth {growth:.3f} B per "
              f"training token", flush=True)


if __name__ == "__main__":
    main()
