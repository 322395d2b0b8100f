"""Serving: the OpenAI-compatible API over one base and many LoRAs (serve.py), batched file
generation (generate.py), and the commands that hand a model to vLLM or llama.cpp."""
