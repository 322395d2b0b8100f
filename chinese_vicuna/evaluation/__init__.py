"""Evaluation: multiple-choice benchmarks (C-Eval, CMMLU) by their official protocols, answers to
MT-bench-format questions from a local model or an endpoint, and MT-bench-style LLM judging.

- `choice`: subject tables, the official prompts, letter continuation ids, batched scoring.
- `answers`: MT-bench questions → FastChat answer records (local base + LoRA, or an endpoint).
- `judge`: judge prompts, verdict parsing, single / pairwise judging and aggregation.
- `endpoint`: the one place an OpenAI-compatible client is built.
"""
