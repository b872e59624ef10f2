"""The core every package imports, and which imports none of them: the run config (`core.config`), artifacts
and manifests (`core.artifacts`), the shared records (`core.records`: the top-k target, vocabulary size, EOS
ids, the held-out rule), packed rows and their reader (`core.packed`), packed-document attention and training
positions (`core.packing`), trainer checkpoints (`core.checkpoint`), reproducible sampling (`core.sampling`)
and the offline benchmark files (`core.benchmarks`). See docs/ARCHITECTURE.md for the layering."""
