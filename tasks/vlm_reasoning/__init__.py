"""``vlm_reasoning``: image / video question answering with ``<think>``/``<answer>`` rewards.

Modules: ``data`` (loaders for ours / TRL / verl / LLaVA layouts), ``templates`` (system
prompts, chat messages for qwen-vl-utils), ``rewards`` (accuracy + format), ``task`` (the plugin).
"""
