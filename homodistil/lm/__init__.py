"""The language-model layer that training (``engine``) and evaluation (``eval``) share.

It knows Hugging Face LMs and batches of scored positions (masked tokens for MLM, next tokens
for causal LMs), not pruning, DeepSpeed or the training loop: the forward pass at scored
positions and the held-out probe. Imports only ``config``.
"""
