"""Data: LLaVA-format reading and tokenisation, the procedural easy/hard benchmark, our tokenizer.

``visor.data.llava_format``  read/validate LLaVA JSON/JSONL, chat-template tokenisation with labels
``visor.data.synth``         the procedural benchmark (generators, writer, streams, dense targets)
``visor.data.tokenizer``     the small Qwen2-style tokenizer for checkpoints we build here
"""
