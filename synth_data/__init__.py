"""Synthetic SFT data factory (`distill synth`): teacher samples → verifiers / reward model → rejection
sampling → decontamination and de-duplication → a chat dataset the student is fine-tuned on.

Modules: `prompts` (sources), `generate` (resumable sampling), `sandbox` (contained execution of untrusted
code), `verifiers` (math answers, code tests), `scorers` (reward model), `rejection` (best-of-n),
`decontam` and `filters` (evaluation-set overlap, duplicates), `sft` (chat → ids + assistant loss mask),
`pipeline` (the stage).
"""
