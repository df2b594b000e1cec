"""Training text (L1): prompt templates, the built-in arithmetic task, its tokenizer, SFT data.

Import from the submodules (`megatron_r1.data.sft`, ...); nothing is re-exported here so that
importing the template does not pull in torch or transformers.
"""
