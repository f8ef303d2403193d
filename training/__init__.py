"""PyTorch training for the DDPM epsilon-network: U-Net, data, trainer, reference sampler.

Nothing is imported here, so ``import training.config`` stays cheap and torch-free.
"""
